"""One live process per run dir: an OS-level lock held for the life of a run.

``RUN_DIR/.lock`` is ``flock``-ed exclusively (non-blocking) by the process that trains in the directory and
holds its pid, host, command and start time, so that a second start into the same run dir — whatever its
``resume`` — is refused at once with a line naming the live process.  The kernel drops an ``flock`` when its
holder dies, so a SIGKILLed run never leaves the dir locked: the stale file is simply locked again by the next
run.  A clean release removes the file (it is not part of the run: ``has_run`` never sees it, and eval /
generate on ``RUN_DIR/model`` take no lock).

Recipes take it before anything else touches the run dir — before the process group starts under torchrun,
on rank 0 only (the run dir is shared; a refused rank 0 exits at once and torchrun stops the other ranks,
which are still in the rendezvous, not in a collective).  Within one process the lock is re-entrant: the
recipe, the pipeline around it and the Trainer inside it share one ``flock``, released with the last holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from lmforge.core.errors import RunError

LOCK_FILE = ".lock"

_held: dict[Path, list] = {}  # resolved run dir -> [fd, holders] of this process


def _holder() -> dict[str, object]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe_holder(lock_file: Path) -> str:
    """Who holds ``lock_file``, from what it wrote into it (it writes right after taking the lock: wait a moment
    for a holder caught in between)."""
    for _ in range(20):
        try:
            info = json.loads(lock_file.read_text(encoding="utf-8"))
            return f"pid {info['pid']} on {info['host']} (started {info['started']}: {info['command']})"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.01)
    return "another process"


def _open_locked(run_dir: Path) -> int:
    """An fd of ``run_dir/.lock`` holding its exclusive flock; RunError naming the holder if it is taken."""
    lock_file = run_dir / LOCK_FILE
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunError(f"run dir '{run_dir}' is in use by {_describe_holder(lock_file)}; wait for it to finish "
                           f"or stop it, or choose another run_dir") from None
        # A holder releasing as we opened removed the file we locked: lock the one now at that name instead.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_file).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


class RunLock:
    """This process's hold on a run dir (``with RunLock(run_dir): ...`` or ``lock = RunLock(run_dir)`` ...
    ``lock.release()``); the first holder in a process takes the flock, the last one to release drops it."""

    def __init__(self, run_dir: str | os.PathLike, take: bool = True) -> None:
        self.released = not take  # take=False: a holder that holds nothing (ranks other than 0)
        if not take:
            return
        run_dir = Path(run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise RunError(f"run dir '{run_dir}' is a file, not a directory; choose another run_dir")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"run dir '{run_dir}' cannot be created ({e.strerror or type(e).__name__}); choose a "
                           f"run_dir you can write to") from None
        self.key = run_dir.resolve()
        if self.key not in _held:
            fd = _open_locked(run_dir)
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(_holder()) + "\n").encode())
            _held[self.key] = [fd, 0]
        _held[self.key][1] += 1

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        entry = _held.get(self.key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[self.key]
            try:  # removed while still locked, so no one can lock the old file after we let go
                os.unlink(self.key / LOCK_FILE)
            except OSError:
                pass
            os.close(entry[0])

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # a holder dropped without release (an exception between take and hand-over)
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the OS releases the lock anyway
            pass


def launch_rank() -> int:
    """This process's global rank as torchrun set it (0 without torchrun), known before the process group starts."""
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


def lock_run_dir(run_dir: str | os.PathLike) -> RunLock:
    """Take the run dir's lock on launch rank 0 (the other ranks share rank 0's run dir and hold nothing)."""
    return RunLock(run_dir, take=launch_rank() == 0)


def training_run(run_dir: str | os.PathLike) -> RunLock:
    """The lock for the life of one training command in ``run_dir`` (``with training_run(run_dir): ...``); a full
    disk met inside it is worded by :func:`lmforge.core.errors.user_error`, which says how the run goes on."""
    return lock_run_dir(run_dir)
