"""Every command shown in README.md and docs/*.md still works with the code, so the docs cannot drift.

Commands are found in fenced code blocks and inline code: `python <script> ...` (also `.venv/bin/python`,
`torchrun ... <script> ...`), `python -m <module>` and `make <target> [VAR=...]`. Nothing is run; each is checked
in-process:
- a Hydra script (`@hydra.main`, e.g. train.py): the overrides compose with Hydra's compose API, like `--cfg job`.
  A `-m` sweep composes once per value of each choice/range sweep (the others at their first value); an interval
  sweep (Optuna) needs its key to exist;
- predict.py: every key is one predict.py knows; any other script or module: it exists;
- make: the target and the variables exist in the Makefile, and every recipe line that runs python or torchrun is
  checked as above with the variables put in (so `ARGS` of `make train` / `make sweep` must compose).
Placeholders, the one explicit rule: optional parts of a synopsis (`[ARGS=...]`, a `[` that starts a word) and the
words `...`, `<name>`, `$(VAR)` are dropped; a value containing `<...>`, `...` or `$(` only needs its key (or
config group) to exist. Values are never checked against the file system, so `/path/to/images` needs no rule.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from lab.predict import DEFAULTS as PREDICT_KEYS

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"(`+)((?:(?!\n\s*\n)[^`])+?)\1")  # not across a blank line (a paragraph's end)
COMMAND = re.compile(r"^(?:\$\s+)?(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:\S*/)?(?:python3?|torchrun|make)(?:\s|$)")
OPTIONAL = re.compile(r"(?<!\S)\[[^\]]*\]")  # a list value follows `=`, never a space
PLACEHOLDER_WORD = re.compile(r"<[^>]*>|\.\.\.|\$\(\w+\)")
PLACEHOLDER_VALUE = re.compile(r"<[^>]*>|\.\.\.|\$\(")
ENV_VAR = re.compile(r"[A-Z_][A-Z0-9_]*=.*")
HYDRA_MAIN = re.compile(r'@hydra\.main\([^)]*config_name="([^"]+)"')  # train.py and any script like it
ABSENT = object()


class DocError(Exception):
    """A documented command that does not work."""


@dataclass(frozen=True)
class Command:
    where: str  # file:line
    text: str


def doc_commands(paths: list[Path] = DOCS) -> list[Command]:
    """Command-like lines of fenced code blocks (`\\` continues one) and inline code (which may wrap a line)."""
    found = []
    for path in paths:
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        candidates, prose = [], []  # prose: the text outside code blocks, line numbers kept
        in_fence, pending, start = False, "", 0
        for n, line in enumerate(path.read_text().splitlines(), 1):
            prose.append("" if in_fence or FENCE.match(line) else line)
            if FENCE.match(line):
                in_fence, pending = not in_fence, ""
            elif in_fence:
                start = start if pending else n
                pending = pending + line.strip()
                if pending.endswith("\\"):
                    pending = pending[:-1]
                else:
                    candidates.append((start, pending))
                    pending = ""
        text = "\n".join(prose)
        for m in INLINE.finditer(text):
            code = " ".join(m.group(2).split()).replace("\\|", "|")  # `\|`: a pipe inside a table
            candidates.append((text.count("\n", 0, m.start()) + 1, code))
        found += [
            Command(f"{where}:{n}", c.strip())
            for n, c in sorted(candidates, key=lambda c: c[0])
            if COMMAND.match(c.strip())
        ]
    return found


def check(text: str) -> None:
    """Raise DocError (or Hydra's error) when the command would not work."""
    text = re.sub(r"<[^<>]*>", "<x>", OPTIONAL.sub("", text))  # `<image file or folder>`: one placeholder
    words = shlex.split(text, comments=True)
    words = [w for w in words if not PLACEHOLDER_WORD.fullmatch(w) and w != "$"]
    shell = [i for i, w in enumerate(words) if w in ("|", "&&", ";") or w.startswith((">", "2>", "<"))]
    words = words[: shell[0]] if shell else words  # `make train > log`: the command before the redirection
    while words and ENV_VAR.fullmatch(words[0]):
        words.pop(0)
    program, args = Path(words[0]).name, words[1:]
    if program == "make":
        return check_make(args)
    if program == "torchrun":
        scripts = [i for i, w in enumerate(args) if w.endswith(".py")]
        return check_script(args[scripts[0]], args[scripts[0] + 1 :]) if scripts else None  # bare mention
    if args[:1] == ["-c"] or not args:
        return None  # python -c "...": not a command of this project
    if args[0] == "-m":
        if importlib.util.find_spec(args[1]) is None:
            raise DocError(f"no module {args[1]}")
        return None
    return check_script(args[0], args[1:])


def check_script(script: str, args: list[str]) -> None:
    path = ROOT / script
    if not path.is_file():
        raise DocError(f"no file {script}")
    if path.name == "predict.py":
        unknown = [key for key in (a.partition("=")[0] for a in args) if key not in PREDICT_KEYS]
        if unknown:
            raise DocError(f"predict.py has no key {unknown[0]!r}; its keys: {', '.join(PREDICT_KEYS)}")
    elif app := HYDRA_MAIN.search(path.read_text()):
        check_hydra_app(app.group(1), args)


@functools.cache
def composed(config_name: str, overrides: tuple[str, ...]) -> DictConfig:
    """What `python train.py <overrides> --cfg all` would print (cached: the docs repeat commands)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=True)


def check_hydra_app(config_name: str, args: list[str]) -> None:
    try:
        cli = get_args_parser().parse_args(args)  # Hydra's own flags: -m, --cfg job, --help, -cn ...
    except SystemExit:
        raise DocError(f"train.py does not accept {' '.join(args)}") from None
    fixed, sweeps, key_only = [], [], []
    for word in cli.overrides:
        key, _, value = word.partition("=")
        if PLACEHOLDER_VALUE.search(value):  # Hydra's grammar rejects `<`: only the key is checked
            key_only.append(key)
            continue
        (override,) = OverridesParser.create().parse_overrides([word])
        if override.is_sweep_override() and cli.multirun:
            try:
                values = [f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()]
                sweeps.append(values)
            except HydraException:  # interval or glob: values come from the sweeper
                key_only.append(key)
        else:
            fixed.append(word)  # a sweep without -m fails in compose, as it would in Hydra
    first = [values[0] for values in sweeps]
    variants = [first, *([*first[:i], v, *first[i + 1 :]] for i, vs in enumerate(sweeps) for v in vs[1:])]
    for variant in variants:
        cfg = composed(cli.config_name or config_name, (*fixed, *variant))
    for key in key_only:
        if key.startswith("+"):
            continue  # `+key=<value>` adds a key that need not exist
        key = re.sub(r"@.*", "", key.lstrip("~"))  # `~key` deletes one, `group@package` places a group
        if key in cfg.hydra.runtime.choices or (CONF / key).is_dir():
            continue
        if OmegaConf.select(cfg, key, default=ABSENT) is ABSENT:
            raise DocError(f"no config key or group {key!r}")


def makefile() -> tuple[dict[str, list[str]], dict[str, str], str]:
    """(target → recipe lines, variable → value, default goal) of the Makefile."""
    recipes: dict[str, list[str]] = {}
    variables, goal, target = {}, "", None
    for line in (ROOT / "Makefile").read_text().splitlines():
        if line.startswith("\t") and target:
            recipes[target].append(line.strip())
        elif m := re.match(r"^([A-Za-z_][\w.]*)\s*[?:]?=\s*(.*?)\s*$", line):
            variables[m.group(1)] = m.group(2)
            target = None
        elif m := re.match(r"^([\w.-]+):(?!=)", line):
            target = m.group(1)
            recipes[target] = []
            goal = goal or (target if not target.startswith(".") else "")
    return recipes, variables, variables.get(".DEFAULT_GOAL", goal)


def expand(text: str, variables: dict[str, str]) -> str:
    for _ in range(10):  # variables refer to variables: BIN := $(VENV)/bin
        text = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), text)
    return text


def check_make(args: list[str]) -> None:
    recipes, variables, goal = makefile()
    assigned = dict(a.split("=", 1) for a in args if "=" in a)
    targets = [a for a in args if "=" not in a and not a.startswith("-")] or [goal]
    for var in assigned:
        if var not in variables and f"$({var})" not in (ROOT / "Makefile").read_text():
            raise DocError(f"the Makefile has no variable {var}")
    for target in targets:
        if target not in recipes or target.startswith("."):
            raise DocError(f"no make target {target!r} (make help lists them)")
        for line in (expand(line, {**variables, **assigned}) for line in recipes[target]):
            if COMMAND.match(line) and not line.startswith("make"):
                check(line)


COMMANDS = doc_commands()


def test_the_docs_show_commands() -> None:
    """The extraction itself works: the README's quick start is found."""
    texts = [c.text for c in COMMANDS if c.where.startswith("README.md")]
    assert any(t.startswith("make train") for t in texts)
    assert sum("train.py" in t for t in texts) >= 10


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_works(command: Command) -> None:
    try:
        check(command.text)
        error = None
    except (DocError, HydraException, ValueError) as e:  # ValueError: shlex (unbalanced quotes)
        error = e
    if error:
        pytest.fail(f"{command.where}: `{command.text}` does not work:\n{error}", pytrace=False)


@pytest.mark.parametrize(
    "text",
    [
        "python train.py model=no_such_model",
        "python train.py trainer.no_such_key=1",
        "python train.py optimizer.lr=1e-3,1e-2",  # a sweep without -m
        "python train.py -m 'model=simple_cnn,no_such_model'",
        "python train.py ckpt_path=<run> no_such_group=<name>",
        "python predict.py ckpt_path=best.pt images=x",
        "python -m no_such_module",
        "python bench/no_such_script.py",
        "make no-such-target",
        "make train-ddp NPROCS=4",
        'make train ARGS="model=no_such_model"',
        'make sweep SWEEP=optuna ARGS="hydra.sweeper.no_such_key=1"',
    ],
)
def test_a_broken_command_is_caught(text: str) -> None:
    with pytest.raises((DocError, HydraException)):
        check(text)


def test_commands_are_found_in_code_blocks_and_inline_code(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Run `python train.py model=mlp` or `make test`; the `make` tool, `label`, `pip install x` are not\n"
        "commands, `python train.py\noptimizer=sgd` is.\n\n"
        "```bash\n$ python train.py \\\n    trainer.max_epochs=2   # two epochs\nls outputs\n```\n"
        "| `make sweep [SWEEP=grid\\|optuna]` | a table |\n"
    )
    assert [(c.where.rsplit(":", 1)[1], c.text) for c in doc_commands([page])] == [
        ("1", "python train.py model=mlp"),
        ("1", "make test"),
        ("1", "make"),
        ("2", "python train.py optimizer=sgd"),
        ("6", "$ python train.py trainer.max_epochs=2   # two epochs"),
        ("10", "make sweep [SWEEP=grid|optuna]"),
    ]
