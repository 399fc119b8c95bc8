"""Secrets stay out of everything a run or a sweep writes: configs, `.hydra/`, `multirun.yaml`, `run_info.json`,
checkpoints, logger files, console and log lines.

Secrets are masked by **value**: every value of a secret-named environment variable, config key or command-line
override (`+wandb_key=...`, `++logger.wandb.api_key=...`) is collected and replaced by `***` wherever it
appears in text lab or Hydra writes. A name is secret when it contains `key`, `token`, `secret`, `passw`,
`credential` or `auth` (any case), or is listed in the environment variable `LAB_SECRETS` (comma-separated names,
e.g. `LAB_SECRETS=HF_HUB,db.dsn`). Values shorter than 6 characters and values that are existing paths are not
treated as secrets (they would mask ordinary text). Pass secrets through the environment, e.g.
`+logger.wandb.api_key=${oc.env:WANDB_API_KEY}`: the value is then never on the command line. Docs:
docs/reliability.md#secrets.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MASK = "***"
# A config key, override or environment variable whose name has one of these words holds a secret.
SECRET_NAME = re.compile(r"key|token|secret|passw|credential|auth", re.IGNORECASE)
USER_SECRETS = "LAB_SECRETS"  # more names (config keys or environment variables), comma-separated
MIN_LENGTH = 6


def is_secret(name: str) -> bool:
    name = str(name).lstrip("+~")
    listed = {n.strip() for n in os.environ.get(USER_SECRETS, "").split(",") if n.strip()}
    return (
        bool(SECRET_NAME.search(name.rsplit(".", 1)[-1]))
        or name in listed
        or name.rsplit(".", 1)[-1] in listed
    )


def _is_secret_value(value: Any) -> bool:
    if not isinstance(value, str) or len(value) < MIN_LENGTH or value == MASK:
        return False
    try:
        return not Path(value).exists()
    except (OSError, ValueError):
        return True


def load_env(path: str | Path = ".env") -> None:
    """Read `KEY=value` lines from `.env` in the working directory into the environment (set variables win)."""
    if Path(path).is_file():
        from dotenv import load_dotenv

        load_dotenv(path, override=False)


def secret_values(config: Any = None, overrides: Iterable[str] = ()) -> set[str]:
    """Every secret value known to this process: secret-named environment variables, the secret keys of `config`,
    and the secret overrides of `overrides`, the command line and this Hydra job (task and hydra overrides)."""
    values = {v for k, v in os.environ.items() if is_secret(k) and _is_secret_value(v)}

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if is_secret(k) and _is_secret_value(v):
                    values.add(v)
                else:
                    walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(config)
    for override in [*overrides, *sys.argv[1:], *_hydra_overrides()]:
        key, sep, value = str(override).partition("=")
        value = value.strip("'\"")
        if sep and is_secret(key) and not value.startswith("${") and _is_secret_value(value):
            values.add(value)
    return values


def _hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    overrides = HydraConfig.get().overrides
    return [*overrides.task, *overrides.hydra]


def redact(value: Any, values: set[str] | None = None) -> Any:
    """A copy of a plain config (dicts/lists): secret-named keys masked, secret `values` masked inside strings."""
    values = secret_values(value) if values is None else values
    if isinstance(value, Mapping):
        return {
            k: (MASK if is_secret(k) and v not in (None, "") else redact(v, values)) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, values) for v in value)
    return scrub_text(value, values) if isinstance(value, str) else value


def redact_override(text: str) -> str:
    """`logger.wandb.api_key=abc` → `logger.wandb.api_key=***` (command lines, `.hydra/overrides.yaml`)."""
    key, sep, _ = text.partition("=")
    return f"{key}{sep}{MASK}" if sep and is_secret(key) else scrub_text(text, secret_values())


def scrub_text(text: str, values: set[str]) -> str:
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


def scrub_file(path: Path, values: set[str]) -> None:
    """Mask secret values (and secret-named YAML keys) in a text file Hydra wrote, in place (atomically)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return
    lines = (
        [_mask_yaml_line(line) for line in text.splitlines(keepends=True)]
        if path.suffix == ".yaml"
        else [text]
    )
    new = scrub_text("".join(lines), values)
    if new != text:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(new)
        os.replace(tmp, path)


def scrub_hydra_dir(output_dir: Path, config: Any = None) -> None:
    """Hydra writes `.hydra/{config,hydra,overrides}.yaml` (and a sweep's `multirun.yaml`) before our code runs."""
    values = secret_values(config)
    for path in sorted((Path(output_dir) / ".hydra").glob("*.yaml")):
        scrub_file(path, values)


def _mask_yaml_line(line: str) -> str:
    """`  api_key: abc` → `  api_key: '***'`; `- logger.wandb.api_key=abc` → `- logger.wandb.api_key=***`."""
    stripped = line.strip()
    if stripped.startswith("- ") and "=" in stripped:
        indent = line[: len(line) - len(line.lstrip())]
        key, _, _ = stripped[2:].partition("=")
        return f"{indent}- {key}={MASK}\n" if is_secret(key) else line
    key, sep, value = line.partition(":")
    if sep and is_secret(key.strip()) and value.strip() not in ("", "null", "''", '""', "{}", "[]"):
        return f"{key}: '{MASK}'\n"
    return line


class RedactingFilter(logging.Filter):
    """Masks known secret values in every log record (the last line of defence for free text)."""

    def __init__(self, values: set[str]) -> None:
        super().__init__()
        self.values = values

    def filter(self, record: logging.LogRecord) -> bool:
        if self.values:
            message = record.getMessage()
            scrubbed = scrub_text(message, self.values)
            if scrubbed != message:
                record.msg, record.args = scrubbed, None
        return True


def install_log_filter(config: Any = None, overrides: Iterable[str] = ()) -> None:
    """Mask the known secret values in every log record this process creates, whichever handler prints it.

    A record factory, not a handler filter: Hydra replaces the root logger's handlers when the launcher starts and
    for each job, and its sweep lines (`#0 : <overrides>`) go through handlers that no job ever saw.
    """
    _LOG_SECRETS.values |= secret_values(config, overrides)
    if not isinstance(logging.getLogRecordFactory(), _RedactingRecordFactory):
        logging.setLogRecordFactory(_RedactingRecordFactory(logging.getLogRecordFactory()))


_LOG_SECRETS = RedactingFilter(set())


class _RedactingRecordFactory:
    def __init__(self, factory: Any) -> None:
        self.factory = factory

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.factory(*args, **kwargs)
        _LOG_SECRETS.filter(record)
        return record
