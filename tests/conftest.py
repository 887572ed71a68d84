import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N`: the workers share the cores, so each (and every command it starts) takes one intra-op thread;
    # N workers x several threads each would oversubscribe the cores and spin-wait.
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Shards and world corpora go to a per-session cache, never the user's ~/.cache."""
    if "LMFORGE_CACHE" not in os.environ:
        os.environ["LMFORGE_CACHE"] = str(tmp_path_factory.mktemp("lmforge-cache"))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine their spin-waits cost seconds;
    modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.  Restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cli(*args: str) -> subprocess.CompletedProcess:
    """``lmforge ARGS`` in this process (``lmforge.apps.cli.main``), output captured: for ``--help`` and the
    one-line-error checks, which would otherwise spend seconds per call starting Python and importing torch.
    An exception escaping ``main`` is printed with its traceback and returns 1, as the real command would;
    :func:`run_cli` still runs the real ``python -m lmforge`` wherever a test trains or generates."""
    import io
    import traceback
    from contextlib import redirect_stderr, redirect_stdout

    from lmforge.apps.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse (--help, usage errors)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # noqa: BLE001 - reported like the interpreter would
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``lmforge ARGS`` in a process of its own and capture its output.

    The process is a fork of ``tests/cli_zygote.py``, which has imported torch and lmforge once, so each call
    skips the seconds of ``import torch``; it runs what ``python -m lmforge ARGS`` runs.  Set
    ``LMFORGE_TEST_FRESH_PROCESS=1`` to start a new interpreter per call instead."""
    env = dict(os.environ)
    cwd = cwd or ROOT
    if os.environ.get("LMFORGE_TEST_FRESH_PROCESS") == "1" or not hasattr(os, "fork"):
        return subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=cwd, env=env, text=True,
                              capture_output=True, timeout=timeout)
    return _Zygote.get().run(list(args), cwd, env, timeout)


class _Zygote:
    """The one ``tests/cli_zygote.py`` process of this test session (started on first use, ended at exit)."""

    _instance: "_Zygote | None" = None

    def __init__(self) -> None:
        import atexit
        import tempfile
        import threading

        self.lock = threading.Lock()
        self.tmp = tempfile.mkdtemp(prefix="lmforge-cli-")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "cli_zygote.py")], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self.proc.stdout.readline()
        if '"ready"' not in ready:
            raise RuntimeError(f"tests/cli_zygote.py did not start (said {ready!r})")
        self.calls = 0
        atexit.register(self.close)

    @classmethod
    def get(cls) -> "_Zygote":
        if cls._instance is None or cls._instance.proc.poll() is not None:
            cls._instance = cls()
        return cls._instance

    def run(self, args: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        import json

        with self.lock:
            self.calls += 1
            out, err = Path(self.tmp) / f"{self.calls}.out", Path(self.tmp) / f"{self.calls}.err"
            req = {"args": args, "cwd": str(cwd), "env": env, "out": str(out), "err": str(err), "timeout": timeout}
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            reply = json.loads(self.proc.stdout.readline())
            stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
            out.unlink()
            err.unlink()
        if reply.get("timeout"):
            raise subprocess.TimeoutExpired(["lmforge", *args], timeout, stdout, stderr)
        return subprocess.CompletedProcess(["lmforge", *args], reply["rc"], stdout, stderr)

    def close(self) -> None:
        import shutil

        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)
