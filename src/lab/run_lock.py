"""One process per run folder: an exclusive POSIX lock (`fcntl.lockf`) on `<run dir>/.lock`, held while the run lives.

The OS drops the lock when the process ends, however it ends (even `kill -9`), so a stale lock never blocks a
resume. A POSIX lock belongs to the process alone: DataLoader workers (forked, so holding copies of its
descriptors) do not hold it, and a resume right after a kill is not refused while they wind down. A second
process on the same folder stops at once with one line naming the running one. torchrun's ranks share rank 0's
run dir and rank 0's lock (ranks > 0 take none). The lock is local to a machine: on a network filesystem two
machines may not see each other's lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from lab.errors import UserError

LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # run dir → open descriptor of its lock file


def acquire(run_dir: str | Path) -> None:
    """Lock `run_dir` for this process (a no-op when it already holds it); UserError when another process does."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held or int(os.environ.get("RANK", "0") or 0) > 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            os.close(fd)
            raise
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(
            f"another process ({holder}) is running in this run folder",
            str(run_dir),
            "wait for it to end or stop it, or give this run another hydra.run.dir",
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _held[run_dir] = fd


def release(run_dir: str | Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the lock
