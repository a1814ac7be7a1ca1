"""Long-lived worker processes that answer JSON requests, one line each way.

The side-by-side benchmarks keep one process per contender (ours, the published code) alive and
ask them in turn for one timed call at a time, so that the machine's drift hits every contender
alike. Parent side: ``Worker``; child side: ``serve(handler)``. No project module is imported
here: the published code's worker imports this file in a process whose ``models`` package must
be the published one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Callable, Optional


class WorkerError(RuntimeError):
    """A worker answered with an error, or died."""


class Worker:
    """``python SCRIPT ARGS...`` started in ``cwd``, serving requests until ``close()``."""

    def __init__(self, name: str, argv: list[str], cwd: Optional[str] = None, env: Optional[dict] = None):
        self.name = name
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable] + argv, cwd=cwd, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1)

    def _stderr_tail(self, lines: int = 3) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        tail = [ln.strip() for ln in self._stderr.read().splitlines() if ln.strip()][-lines:]
        return " | ".join(tail)

    def call(self, op: str, **request) -> dict:
        """Send one request and wait for its answer; WorkerError if the worker failed."""
        try:
            self.proc.stdin.write(json.dumps(dict(request, op=op)) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            code = self.proc.poll()
            raise WorkerError(f"{self.name} worker exited (status {code}): {self._stderr_tail() or 'no message'}")
        answer = json.loads(line)
        if "error" in answer:
            raise WorkerError(f"{self.name}: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(handler: Callable[[dict], dict]) -> int:
    """Child side: answer every request line on stdin with ``handler(request)`` on stdout.

    Anything else the process prints (the published modules print at import) goes to stderr,
    so the answer channel stays clean. An exception becomes ``{"error": "<Type>: <message>"}``.
    """
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if request.get("op") == "exit":
            break
        try:
            answer = handler(request)
        except Exception as exc:  # reported to the parent, which names the worker
            answer = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
    return 0
