"""Stop signals (SIGTERM, SIGINT, SIGHUP) turned into an exception, so that cleanup runs.

Python runs no ``finally`` block and no ``ExitStack`` callback when SIGTERM or SIGHUP kill
it: servers, clusters and subprocesses a command started would outlive it. Inside
:func:`stop_on_signals` the first such signal raises :class:`Stopped` in the main thread;
every context manager the command entered (``clc_dask.cluster.connect``,
``clc_dask.demo.serve_region``, atomic writers, the run's store lock) then releases what it
holds while the exception travels up. Further signals during that cleanup are logged and
ignored, so that a second Ctrl-C or a repeated ``kill`` cannot cut it short (SIGKILL still
can). The command then exits with ``128 + signal number``, as shells report a process
killed by that signal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from types import FrameType

log = logging.getLogger(__name__)

#: Signals that stop a command (Kubernetes, systemd and ``kill`` send SIGTERM; Ctrl-C sends
#: SIGINT; a closed terminal sends SIGHUP).
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stopped(BaseException):  # noqa: N818 - a stop request, not an error
    """The process received a stop signal. A ``BaseException`` (like ``KeyboardInterrupt``),
    so that ``except Exception`` blocks do not swallow it.

    Attributes:
        signum: the signal received.
    """

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"stopped by {signal_name(signum)}")

    @property
    def exit_code(self) -> int:
        """``128 + signum`` (143 for SIGTERM, 130 for SIGINT, 129 for SIGHUP)."""
        return 128 + self.signum


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15, etc."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


#: Functions whose exceptions Python prints and drops (finalizers, garbage-collector callbacks).
_UNRAISABLE_FUNCTIONS = frozenset({"__del__", "_gc_callback"})


def _unraisable(frame: FrameType | None) -> bool:
    """True if ``frame`` (where a signal interrupted the main thread) runs a finalizer or a
    garbage-collector callback, where a raised :class:`Stopped` would be lost."""
    while frame is not None:
        if frame.f_code.co_name in _UNRAISABLE_FUNCTIONS or frame.f_code.co_filename.endswith("weakref.py"):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def stop_on_signals(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[list[int]]:
    """Raise :class:`Stopped` in the main thread on the first of ``signals``; ignore later ones.

    Yields the list of signals received so far (empty until one comes). The previous
    handlers are restored when the block ends. Must be entered from the main thread.
    """
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if _unraisable(frame):  # an exception raised here would be printed and dropped: ask again
            threading.Timer(0.1, os.kill, (os.getpid(), signum)).start()
            return
        received.append(signum)
        if len(received) > 1:  # already stopping: let the cleanup finish
            log.warning("%s received while stopping: still releasing what this command started",
                        signal_name(signum))
            return
        raise Stopped(signum)

    previous = {}
    for signum in signals:
        previous[signum] = signal.signal(signum, handler)
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
