import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Shards and world corpora go to a per-session cache, never the user's ~/.cache."""
    if "LMFORGE_CACHE" not in os.environ:
        os.environ["LMFORGE_CACHE"] = str(tmp_path_factory.mktemp("lmforge-cache"))
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
    """Run ``python -m lmforge ARGS`` in a subprocess and capture its output."""
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=cwd or ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout)
