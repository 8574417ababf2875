"""`flashllm ARGS...` run in the test's own process: what the console script would return and print.

The console script is `sys.exit(main())`, so `main(argv)`'s return value is the exit code; argparse's own
errors (a malformed option value) exit through SystemExit(2). Running it in-process spares each call a
Python + torch start; tests/test_cli.py keeps one run of the installed command as a real subprocess.
"""
from __future__ import annotations

import contextlib
import io
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class CliRun:
    returncode: int
    stdout: str
    stderr: str


def run_flashllm(*args: str) -> CliRun:
    """main(argv) with stdout and stderr captured; the environment is restored afterwards (a flag such as
    --no-verify-reads sets a variable for the process and the workers it spawns)."""
    from flashllm.runtime.clients.cli import main

    environment = dict(os.environ)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                returncode = main(list(args)) or 0  # sys.exit(None) exits 0
            except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
                returncode = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(environment)
    return CliRun(returncode, stdout.getvalue(), stderr.getvalue())
