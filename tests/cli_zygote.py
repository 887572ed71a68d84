"""A process that has imported torch and lmforge once and forks a fresh child for every ``lmforge`` command.

Why: on CI's 2-core machine ``import torch`` alone takes about 4 s, and the smoke tests run the CLI dozens of
times.  A forked child starts with everything imported and runs exactly what ``python -m lmforge ARGS``
runs (``lmforge.apps.cli.main``), in its own process: own working directory, environment, stdout/stderr and
exit status, nothing shared with the tests or with the other commands.

Fork safety: this process never runs a tensor operation (so no intra-op thread pool exists yet to be lost
across ``fork``); each child creates its own.

Protocol (one JSON object per line): request ``{"args", "cwd", "env", "out", "err", "timeout"}`` on stdin;
reply ``{"rc": int}`` or ``{"rc": null, "timeout": true}`` on stdout once the child has ended.  The child's
output goes to the files ``out`` and ``err``, so a chatty command never blocks on a pipe.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def _child(req: dict) -> None:
    os.setsid()  # its own process group: a timeout kills whatever it started too
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdin.close()
    sys.argv = ["lmforge", *req["args"]]
    code = 1
    try:
        from lmforge.apps.cli import main

        code = main(list(req["args"]))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported as the interpreter would
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)


def _wait(pid: int, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return None
        time.sleep(0.02)


def main() -> None:
    import torch  # noqa: F401 - the point of this process

    import lmforge.apps.cli  # noqa: F401
    import lmforge.recipes.evaluate  # noqa: F401
    import lmforge.recipes.finetune  # noqa: F401
    import lmforge.recipes.pretrain  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(req)
        rc = _wait(pid, float(req["timeout"]))
        reply = {"rc": rc} if rc is not None else {"rc": None, "timeout": True}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
