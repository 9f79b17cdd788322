"""A time budget shared by named steps run in order (benchmarks/gpu_check.py and its sections).

Each step gets a share of the time still left (what earlier steps did not use flows to later
ones), at most its cap; a step that would get less than `minimum` seconds is skipped with a line
saying so. Each step's result is handed to `save` as soon as the step ends, so a run cut short
keeps what it finished.
"""
from __future__ import annotations

import time
import traceback
from typing import Callable, Dict, Optional, Tuple


class Plan:
    def __init__(self, seconds: float, steps: Dict[str, Tuple[float, Optional[float]]],
                 save: Optional[Callable[[str, dict], None]] = None, minimum: float = 5.0,
                 log: Callable[[str], None] = print):
        """`steps`: name -> (share, cap in seconds or None), in the order they will run."""
        self.end = time.monotonic() + seconds
        self.steps = dict(steps)
        self.save, self.minimum, self.log = save, minimum, log
        self.pending = list(self.steps)
        self.results: Dict[str, dict] = {}

    def left(self) -> float:
        return self.end - time.monotonic()

    def allowance(self, name: str) -> float:
        """Seconds `name` gets if it starts now: its share of what is left among the steps not
        yet run (itself included), at most its cap."""
        share, cap = self.steps[name]
        shares = sum(self.steps[n][0] for n in self.pending)
        seconds = max(self.left(), 0.0) * share / shares
        return seconds if cap is None else min(seconds, cap)

    def run(self, name: str, fn: Callable[[float], dict]) -> dict:
        """Runs fn(deadline) (a time.monotonic() value) unless too little time is left; an
        exception becomes {"error": ...} and the next step runs."""
        seconds = self.allowance(name)
        self.pending.remove(name)
        if seconds < self.minimum:
            return self.skip(name, f"out of time ({seconds:.0f} s for it, "
                                   f"{self.left():.0f} s left)")
        t0 = time.monotonic()
        try:
            result = fn(t0 + seconds)
        except Exception as exc:  # report it, keep the other steps
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result = dict(result, seconds=round(time.monotonic() - t0, 1), allowed_s=round(seconds, 1))
        self.log(f"[{name}] done in {result['seconds']:.0f} s (of {seconds:.0f} s)")
        return self._done(name, result)

    def skip(self, name: str, reason: str) -> dict:
        if name in self.pending:
            self.pending.remove(name)
        self.log(f"[{name}] skipped: {reason}")
        return self._done(name, {"skipped": reason})

    def _done(self, name: str, result: dict) -> dict:
        self.results[name] = result
        if self.save is not None:
            self.save(name, result)
        return result
