"""Secrets stay out of everything a run writes: printed/saved configs, logs, checkpoints, `.hydra/`.

API keys belong in the environment (or a git-ignored `.env`, read before Hydra composes the config). Should one
still reach the config (e.g. `logger.wandb.api_key=...` or `${oc.env:WANDB_API_KEY}`), every key whose name looks
secret is replaced by `***` before the config is printed, logged, saved in a checkpoint or left in `.hydra/`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MASK = "***"
# A config key or environment variable whose name has one of these words holds a secret (`hf_token`, `API_KEY`,
# `client_secret`), but not `tokenizer` or `max_tokens`.
SECRET_NAME = re.compile(
    r"(^|[_-])(api[_-]?key|token|passw(or)?d|secret|credentials?|private[_-]?key)($|[_-])", re.IGNORECASE
)


def is_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(str(name).rsplit(".", 1)[-1]))


def load_env(path: str | Path = ".env") -> None:
    """Read `KEY=value` lines from `.env` in the working directory into the environment (set variables win)."""
    if Path(path).is_file():
        from dotenv import load_dotenv

        load_dotenv(path, override=False)


def redact(value: Any) -> Any:
    """A copy of a plain config (dicts/lists) with the values of secret-looking keys masked."""
    if isinstance(value, Mapping):
        return {k: (MASK if is_secret(k) and v not in (None, "") else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def redact_override(text: str) -> str:
    """`logger.wandb.api_key=abc` → `logger.wandb.api_key=***` (command lines, `.hydra/overrides.yaml`)."""
    key, sep, _ = text.partition("=")
    return f"{key}{sep}{MASK}" if sep and is_secret(key.lstrip("+~")) else text


def secret_values(config: Any = None) -> set[str]:
    """Secret strings to scrub from free text: secret-named env variables and secret config values."""
    values = {v for k, v in os.environ.items() if is_secret(k) and len(v) >= 6}

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if is_secret(k) and isinstance(v, str) and len(v) >= 6:
                    values.add(v)
                else:
                    walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(config)
    return values


def scrub_text(text: str, values: set[str]) -> str:
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, MASK)
    return text


def scrub_hydra_dir(output_dir: Path, config: Any) -> None:
    """Hydra writes `.hydra/{config,hydra,overrides}.yaml` before our code runs: mask secrets in them."""
    values = secret_values(config)
    for path in sorted((output_dir / ".hydra").glob("*.yaml")):
        text = path.read_text()
        lines = [_mask_yaml_line(line) for line in text.splitlines(keepends=True)]
        new = scrub_text("".join(lines), values)
        if new != text:
            path.write_text(new)


def _mask_yaml_line(line: str) -> str:
    """`  api_key: abc` → `  api_key: '***'`; `- logger.wandb.api_key=abc` → `- logger.wandb.api_key=***`."""
    stripped = line.strip()
    if stripped.startswith("- ") and "=" in stripped:
        indent = line[: len(line) - len(line.lstrip())]
        return f"{indent}- {redact_override(stripped[2:])}\n"
    key, sep, value = line.partition(":")
    if sep and is_secret(key.strip()) and value.strip() not in ("", "null", "''", '""'):
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


def install_log_filter(config: Any) -> None:
    """Add `RedactingFilter` to every handler of the root logger (Hydra's console and train.log handlers)."""
    values = secret_values(config)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter(values))
