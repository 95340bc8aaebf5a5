"""Native-crash reports that say what gradindex was doing (issue 19: a heap corruption inside torch
killed a run with only a C-level trace).

In: the command line (:func:`enable`, called once by the CLI) and the current stage (:func:`stage`,
set by the pipeline as it goes). Out: nothing until a native crash (SIGSEGV, SIGABRT, SIGBUS, SIGFPE,
SIGILL); then Python's :mod:`faulthandler` prints every thread's stack, and the first one printed is a
small sleeping "context" thread whose one frame reads

    File "gradindex featurize digits --out d", line 1 in [stage: featurize shard 0 (rows 0-5)]

i.e. the command and the stage in one line, just before the crashing thread's trace. The context
thread blocks in ``os.read`` (no Python frame above its own), costs nothing while idle, and is replaced
when the stage changes. Nothing happens unless :func:`enable` was called.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_state: dict[str, object] = {}


def enable(argv: list[str] | None = None) -> None:
    """Turn on :mod:`faulthandler` (all threads, stderr) with ``argv`` as the command named in a crash."""
    words = [os.path.basename(sys.argv[0]) if sys.argv else "gradindex", *(sys.argv[1:] if argv is None else argv)]
    command = " ".join(word if len(word) <= 80 else word[:77] + "..." for word in words)[:400]
    if command.startswith(("__main__.py", "-m")):
        command = "gradindex " + command.split(" ", 1)[-1]
    try:
        faulthandler.enable(file=sys.__stderr__ or sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError):  # no real stderr (an embedding host): nothing to report to
        return
    _state["command"] = command
    set_stage("start")


def set_stage(name: str) -> None:
    """Name what runs now in a crash report (a no-op unless :func:`enable` was called)."""
    if "command" not in _state:
        return
    if _state.get("pid") != os.getpid():  # a forked child: the parent's context thread did not come along
        _state.pop("wake", None)
        _state["pid"] = os.getpid()
    old = _state.pop("wake", None)
    if old is not None:
        try:
            os.write(old, b"x")  # the previous context thread returns and ends
        except OSError:  # its end of the pipe is gone already: nothing to wake
            pass
        os.close(old)
    read, write = os.pipe()
    _state["wake"] = write
    code = _sleeper.__code__.replace(co_filename=str(_state["command"]), co_name=f"[stage: {name[:200]}]",
                                     co_firstlineno=1)
    sleeper = type(_sleeper)(code, _sleeper.__globals__)
    threading.Thread(target=sleeper, args=(read,), name="gradindex-crash-context", daemon=True).start()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """``with stage("featurize shard 3"):`` — the stage a crash inside the block reports; the previous
    stage is named again afterwards."""
    previous = _state.get("stage", "start")
    _state["stage"] = name
    set_stage(name)
    try:
        yield
    finally:
        _state["stage"] = previous
        set_stage(str(previous))


def _sleeper(fd: int) -> None:
    os.read(fd, 1); os.close(fd)  # noqa: E702  (one line: the frame faulthandler prints is line 1)
