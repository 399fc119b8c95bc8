"""`make rename NAME=<package>` (scripts/rename.py): rename a fresh copy of this repository, then train from it.

The copy is renamed without `pip install -e .` (that would re-point this checkout's virtual environment); its
smoke run imports the renamed package from the copy's src/ instead, with the old package made unimportable.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, cli_env

spec = importlib.util.spec_from_file_location("rename", ROOT / "scripts" / "rename.py")
rename = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rename)

OLD = rename.current_name(ROOT)
NEW = "petri" if OLD != "petri" else "agar"


def git(cwd: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True).stdout


def test_only_the_name_is_rewritten() -> None:
    text = (
        f"import {OLD}\nfrom {OLD}.data import x  # src/{OLD}/data\n_target_: {OLD}.models.simple.MLP\n"
        f'all = ["{OLD}[wandb,sweep]"]\nproject: {OLD}\n{OLD.upper()}_RUN_ID=1\nhydra_plugins.{OLD}_optuna\n'
        f"{OLD}el co{OLD} {OLD}_times py{OLD} {OLD.capitalize()} https://example.com/{OLD}/x\n"
    )
    assert rename.rename_text(text, OLD, "mynet") == (
        "import mynet\nfrom mynet.data import x  # src/mynet/data\n_target_: mynet.models.simple.MLP\n"
        'all = ["mynet[wandb,sweep]"]\nproject: mynet\nMYNET_RUN_ID=1\nhydra_plugins.mynet_optuna\n'
        f"{OLD}el co{OLD} {OLD}_times py{OLD} {OLD.capitalize()} https://example.com/{OLD}/x\n"
    )


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "no new name"),
        ("MyNet", "not lower case"),
        ("my-net", "not a valid Python package name"),
        ("2net", "not a valid Python package name"),
        ("class", "not a valid Python package name"),
        ("json", "standard library"),
        ("torch", "already an installed module"),
        ("train", "shadowed by ./train"),
        ("conf", "shadowed by ./conf"),
    ],
)
def test_bad_names_are_refused(name: str, why: str) -> None:
    with pytest.raises(rename.RenameError, match=why) as info:
        rename.check_name(name, ROOT)
    assert str(info.value).startswith("error: ") and "(NAME)" in str(info.value)


def copy_repository(dest: Path) -> Path:
    """This checkout's files as git would commit them (uncommitted edits included), committed in a new repo."""
    files = git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for rel in filter(None, files):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "template")
    return dest


def run_rename(repo: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "scripts/rename.py", *args, "--no-install"]
    return subprocess.run(cmd, cwd=repo, env=env or cli_env(), capture_output=True, text=True, timeout=120)


def test_rename_a_copy_and_train_from_it(tmp_path: Path) -> None:
    repo = copy_repository(tmp_path / "project")
    # A dirty tree is refused, and left as it was.
    (repo / "notes.txt").write_text("work in progress\n")
    proc = run_rename(repo, NEW)
    assert proc.returncode == 2 and "error: the git tree has uncommitted changes" in proc.stderr
    assert (repo / "src" / OLD).is_dir() and git(repo, "status", "--porcelain") == "?? notes.txt\n"
    (repo / "notes.txt").unlink()

    # The old package cannot be imported by the smoke run (this checkout's venv would otherwise provide it).
    blocker = tmp_path / "blocker" / OLD
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text(f"raise ImportError('stale import of the old package {OLD}')\n")
    proc = run_rename(repo, NEW, env=cli_env(PYTHONPATH=str(blocker.parent)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "python train.py debug=fast" in proc.stdout

    assert not (repo / "src" / OLD).exists() and (repo / "src" / NEW / "train.py").is_file()
    assert (repo / "src" / "hydra_plugins" / f"{NEW}_optuna.py").is_file()
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "rename")
    stale = re.compile(rf"\b{OLD}\b|\b{OLD.upper()}_")
    leftovers = [
        f"{rel}:{n}: {line.strip()}"
        for rel in git(repo, "ls-files").splitlines()
        for n, line in enumerate((repo / rel).read_text(errors="replace").splitlines(), 1)
        if stale.search(line)
    ]
    assert not leftovers, "the old name is left in:\n" + "\n".join(leftovers)
    pyproject = (repo / "pyproject.toml").read_text()
    assert f'name = "{NEW}"' in pyproject and f'"{NEW}[wandb,sweep,export,dev]"' in pyproject
    assert f'project: str = "{NEW}"' in (repo / "src" / NEW / "config.py").read_text()  # the W&B project

    # The smoke run trained from the renamed package: its run folder and the config it ran with.
    (run_dir,) = (repo / "outputs" / "debug" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "success" and 0 <= metrics["test/acc"] <= 1
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert f"_target_: {NEW}.data.digits.Digits" in config
    assert f"_target_: {NEW}.loggers.tensorboard.TensorBoardLogger" in config

    # Renaming again to the same name changes nothing.
    proc = run_rename(repo, NEW)
    assert proc.returncode == 0 and f"already named {NEW}: nothing to do" in proc.stdout
    assert git(repo, "status", "--porcelain") == ""
