"""Rename the project and its package: `make rename NAME=<package>` (or `python scripts/rename.py <package>`).

A template is cloned to start a new project, so its name should not stay. This moves `src/<old>` to `src/<new>`,
rewrites the name in every text file git knows about (imports, `_target_` strings, pyproject.toml, the W&B
project, docs, paths in comments), re-installs the package into the virtual environment it runs in, and runs
the quick checks (ruff, one `python train.py debug=fast`). Run again with the same name, it does nothing.

What counts as the name: the whole lower-case word (`lab`, `lab.train`, `src/lab/`, `lab[wandb]`), the Optuna
plugin module (`lab_optuna`) and the upper-case prefix of environment variables (`LAB_RUN_ID`). Words that merely
contain it (`label`, `collab`, `lab_times`), capitalised words and URLs are left alone. The current name is read
from pyproject.toml, so a renamed project can be renamed again. Standard library only: it runs before any install.
"""

from __future__ import annotations

import argparse
import importlib.util
import keyword
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Walked only where git is not available: what git would ignore.
SKIP_DIRS = {
    ".git",
    ".venv",
    "outputs",
    "data",
    "multirun",
    "wandb",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
}


class RenameError(Exception):
    """A problem the user can fix: printed as one `error: <what> (<key>): <fix>` line, exit 2."""

    def __init__(self, what: str, key: str, fix: str) -> None:
        super().__init__(f"error: {what} ({key}): {fix}")


def current_name(root: Path) -> str:
    """The distribution name in pyproject.toml, which is also the package's folder under src/."""
    match = re.search(r'^name\s*=\s*"([^"]+)"', (root / "pyproject.toml").read_text(), re.MULTILINE)
    if not match or not (root / "src" / match.group(1)).is_dir():
        raise RenameError("cannot tell the current package name", "pyproject.toml", "set [project] name")
    return match.group(1)


def check_name(name: str, root: Path) -> None:
    """The new name must be importable as itself, and nothing else may be imported under it."""
    fix = "choose a lower-case Python identifier that no other module uses, e.g. NAME=mynet"
    if not name:
        raise RenameError("no new name given", "NAME", "make rename NAME=<package>")
    if not name.isidentifier() or keyword.iskeyword(name):
        raise RenameError(f"{name!r} is not a valid Python package name", "NAME", fix)
    if name != name.lower():
        raise RenameError(f"{name!r} is not lower case (PEP 8 package names are)", "NAME", fix)
    if name in sys.stdlib_module_names:
        raise RenameError(f"{name!r} is a standard library module", "NAME", fix)
    if (root / name).exists() or (root / f"{name}.py").exists():  # `python train.py` puts the root first
        raise RenameError(f"{name!r} would be shadowed by ./{name} in the repository", "NAME", fix)
    if importlib.util.find_spec(name) is not None:
        raise RenameError(f"{name!r} is already an installed module", "NAME", fix)


def name_pattern(old: str) -> re.Pattern[str]:
    """URLs (kept as they are), the whole word `old` or `old_optuna`, and `OLD_` prefixes of variables."""
    return re.compile(rf"[a-z][a-z0-9+.-]*://\S+|\b{old}(?=\b|_optuna\b)|\b{old.upper()}(?=_)")


def rename_text(text: str, old: str, new: str) -> str:
    def swap(match: re.Match[str]) -> str:
        word = match.group()
        if "://" in word:
            return word
        return new.upper() if word.isupper() else new

    return name_pattern(old).sub(swap, text)


def project_files(root: Path) -> list[Path]:
    """Files git tracks or would track (relative paths); every file outside SKIP_DIRS without git."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        paths = [Path(p) for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = [
            p.relative_to(root) for p in root.rglob("*") if not SKIP_DIRS & set(p.relative_to(root).parts)
        ]
    return sorted(p for p in set(paths) if (root / p).is_file() and not (root / p).is_symlink())


def check_clean(root: Path) -> None:
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, check=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return  # not a git repository: nothing to compare against
    if status.strip():
        raise RenameError(
            "the git tree has uncommitted changes",
            "git status",
            "commit or stash them, so the rename is one reviewable change (or add FORCE=1 / --force)",
        )


def rewrite(root: Path, old: str, new: str) -> tuple[int, int]:
    """Rewrite the name in every text file, then move files whose path carries it. Returns (edited, moved)."""
    files = project_files(root)
    edited = 0
    for rel in files:
        path = root / rel
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable: no name to rewrite
        renamed = rename_text(text, old, new)
        if renamed != text:
            path.write_text(renamed, encoding="utf-8")
            edited += 1
    moves = {rel: Path(rename_text(rel.as_posix(), old, new)) for rel in files}
    moves = {src: dst for src, dst in moves.items() if src != dst}
    for src, dst in moves.items():
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        os.replace(root / src, root / dst)
    for folder in sorted({p for src in moves for p in src.parents if p.parts}, key=lambda p: -len(p.parts)):
        path = root / folder
        if path.is_dir() and all("__pycache__" in q.parts for q in path.rglob("*") if q.is_file()):
            shutil.rmtree(path)  # emptied by the moves (caches aside)
    return edited, len(moves)


def run(step: str, args: list[str], root: Path, env: dict[str, str] | None = None) -> None:
    """Run one step quietly; its output is shown only when it fails."""
    print(f"{step} ...", flush=True)
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        raise RenameError(f"{step} failed after the rename", " ".join(args[1:]), "see its output above")


def reinstall(root: Path, old: str) -> None:
    """Swap the editable install of the old distribution for the new one (dependencies are already there)."""
    if sys.prefix == sys.base_prefix:
        print("not in a virtual environment: re-install the package yourself (pip install -e .)")
        return
    pip = [sys.executable, "-m", "pip", "--quiet"]
    run(f"pip uninstall {old}", [*pip, "uninstall", "--yes", old], root)
    shutil.rmtree(root / "src" / f"{old}.egg-info", ignore_errors=True)  # else pip still lists the old name
    run("pip install -e .", [*pip, "install", "--no-deps", "-e", str(root)], root)


def quick_checks(root: Path) -> None:
    """ruff (fix and format first: a longer name can re-sort imports or push a line past the limit), then
    `python train.py debug=fast` importing the renamed package from src/."""
    ruff = [sys.executable, "-m", "ruff"]
    run("ruff check --fix", [*ruff, "check", "--fix", "--quiet", "."], root)
    run("ruff format", [*ruff, "format", "--quiet", "."], root)
    path = os.pathsep.join(filter(None, [str(root / "src"), os.environ.get("PYTHONPATH")]))
    smoke = [sys.executable, "train.py", "debug=fast", "print_config=false", "trainer.progress_bar=false"]
    run("python train.py debug=fast", smoke, root, dict(os.environ, PYTHONPATH=path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", nargs="?", default="", help="the new package name, e.g. mynet")
    parser.add_argument("--force", action="store_true", help="rename even with uncommitted changes")
    parser.add_argument("--no-install", action="store_true", help="do not re-install the package")
    parser.add_argument("--no-checks", action="store_true", help="skip ruff and the smoke run")
    args = parser.parse_args(argv)
    try:
        old = current_name(ROOT)
        if args.name == old:
            print(f"already named {old}: nothing to do")
            return 0
        check_name(args.name, ROOT)
        if not args.force:
            check_clean(ROOT)
        edited, moved = rewrite(ROOT, old, args.name)
        print(f"renamed {old} → {args.name}: {edited} files edited, {moved} moved")
        if not args.no_install:
            reinstall(ROOT, old)
        if not args.no_checks:
            quick_checks(ROOT)
    except RenameError as e:
        print(e, file=sys.stderr)
        return 2
    print(
        f"done: review with `git status` and `git diff`, then `git add -A && git commit -m 'Rename to {args.name}'`"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
