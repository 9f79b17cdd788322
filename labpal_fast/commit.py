"""The writes of one step, finished once begun: the fault model of docs/algorithm.md.

A step's optimizer-side writes (accumulating the gradient, forming d, moving θ, the line's
state) cannot be undone cheaply: d ← β·d + ḡ overwrites the only copy of d, and a backup would
cost passes over memory on every update. So once they have begun they are finished:

- Ctrl-C (SIGINT) is held back while they run, and delivered when they are done;
- an op, or a `Line` method, is assumed to raise before it writes anything (a failed launch or
  allocation); one that raises is called once more, and the first error is raised when the
  writes are done. A second error propagates at once: the writes cannot be finished, and the
  optimizer marks itself broken (it refuses further steps) rather than go on half made.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Optional

try:  # the C functions behind signal.getsignal / signal.signal, without their enum conversions,
    # which cost ~5 µs a call: this runs on every step
    from _signal import getsignal as _getsignal, signal as _setsignal
except ImportError:  # not CPython
    from signal import getsignal as _getsignal, signal as _setsignal


class Commit:
    """``with Commit() as run: run(op, *args)``: runs a step's writes to the end (module doc)."""

    def __init__(self) -> None:
        self.error: Optional[BaseException] = None  # the first op error, raised at exit
        self._held = False
        self._handler: Any = None  # the SIGINT handler to put back (None: nothing installed)

    def __enter__(self) -> "Commit":
        # only the main thread may set signal handlers, and only it receives KeyboardInterrupt;
        # getsignal is None for a handler not set from Python, which could not be put back
        if threading.current_thread() is threading.main_thread() and \
                _getsignal(signal.SIGINT) is not None:
            self._handler = _setsignal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum: int, frame: Any) -> None:
        self._held = True

    def __call__(self, op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return op(*args, **kwargs)
        except BaseException as exc:
            if self.error is not None:
                raise  # the second error of these writes: they cannot be finished
            self.error = exc
        return op(*args, **kwargs)  # it raised before writing: run it again

    def __exit__(self, kind, value, traceback) -> bool:
        if self._handler is not None:
            _setsignal(signal.SIGINT, self._handler)
        if self._held:
            signal.raise_signal(signal.SIGINT)  # to the handler put back: KeyboardInterrupt
        if kind is None and self.error is not None:
            error, self.error = self.error, None
            raise error
        return False
