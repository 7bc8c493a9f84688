"""Running independent pieces of work in forked worker processes (Linux), or here.

Decoding steps the prior token by token: each step is hundreds of operations too small to share
between threads, so parallel work is split by tiles instead, one share per process. A process that
is not scheduled (on a busy machine) delays only its own share.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

from ..errors import BsqError

T = TypeVar("T")
R = TypeVar("R")


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def can_fork() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "fork")


def run_shares(fn: Callable[[T], R], shares: list[T]) -> list[R]:
    """[fn(s) for s in shares], the first share here and each other in a forked child process.

    Results come back pickled through a pipe. A child's BsqError is raised here as it was; any other
    failure becomes a BsqError naming it. Where fork is unavailable everything runs here, in order.
    fn must not print or touch locks held by other threads (the child has only this thread).
    """
    if len(shares) <= 1 or not can_fork():
        return [fn(s) for s in shares]
    children: list[tuple[int, int]] = []
    try:
        for share in shares[1:]:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: compute, send, leave without running the parent's exit handlers
                code = 0
                try:
                    os.close(r)
                    try:
                        payload = pickle.dumps((True, fn(share)))
                    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
                        err = e if isinstance(e, BsqError) else BsqError(f"internal error: {type(e).__name__}: {e}")
                        payload = pickle.dumps((False, err))
                    with os.fdopen(w, "wb") as f:
                        f.write(payload)
                except BaseException:  # noqa: BLE001
                    code = 1
                finally:
                    os._exit(code)
            os.close(w)
            children.append((pid, r))
        results = [fn(shares[0])]
        for pid, r in children:
            with os.fdopen(r, "rb") as f:
                data = f.read()
            os.waitpid(pid, 0)
            children = [c for c in children if c[0] != pid]
            if not data:
                raise BsqError("internal error: a decoding worker process died")
            ok, value = pickle.loads(data)
            if not ok:
                raise value
            results.append(value)
        return results
    finally:  # on an error here, stop the children still running
        for pid, r in children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
            try:
                os.close(r)
            except OSError:
                pass
