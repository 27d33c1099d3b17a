"""Progress of long work: a tqdm bar on a terminal, log lines everywhere else.

``Progress(total, desc, unit)`` counts work (training steps, units) with a rate and an ETA. When
stderr is a terminal (or ``DIFFCORE_PROGRESS=1``) it draws a tqdm bar; otherwise, so that a log
file or a CI log is not flooded with bar redraws, it logs one status line at most every
``interval`` seconds (and at the end) through :mod:`logging`. ``note(text)`` reports one event
(e.g. a finished unit) as a line in both modes. ``DIFFCORE_PROGRESS=0`` or ``enabled=False``
silences both. See :func:`diffcore._env.progress_enabled`.
"""

from __future__ import annotations

import logging
import time

from diffcore import _env

log = logging.getLogger("diffcore.progress")


def format_seconds(seconds: float) -> str:
    """``75.2`` -> ``'1:15'``, ``3725`` -> ``'1:02:05'``."""
    seconds = max(int(round(seconds)), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Counts ``total`` units of work named ``unit`` (see the module docstring).

    ``update(n)`` adds done work, ``set(done)`` sets it (e.g. polled from files), ``close()`` ends
    it. The ETA is measured from the work done since the first update (work found already done at
    the start, e.g. on resume, does not count as speed)."""

    def __init__(
        self, total: int, desc: str, unit: str, *, enabled: bool = True, initial: int = 0, interval: float = 30.0
    ):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done = self._start_done = int(initial)
        self.interval = float(interval)
        self.active = _env.progress_requested(enabled)
        self._bar = None
        if self.active and _env.progress_enabled(enabled):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, dynamic_ncols=True)
        self._start = time.perf_counter()
        self._last_line = self._start

    def update(self, n: int = 1) -> None:
        self.set(self.done + int(n))

    def set(self, done: int) -> None:
        done = min(int(done), self.total)
        if self._bar is not None:
            self._bar.update(done - self.done)
        self.done = done
        now = time.perf_counter()
        if self._bar is None and self.active and now - self._last_line >= self.interval:
            self._last_line = now
            log.info("%s", self.status())

    def status(self) -> str:
        """``'training: 1200/6000 steps (20%), 41.2 steps/s, elapsed 0:29, ETA 1:56'``."""
        elapsed = time.perf_counter() - self._start
        made = self.done - self._start_done
        rate = made / elapsed if elapsed > 0 else 0.0
        percent = 100.0 * self.done / self.total if self.total else 100.0
        eta = format_seconds((self.total - self.done) / rate) if rate > 0 else "?"
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), {rate:.1f} {self.unit}/s, "
            f"elapsed {format_seconds(elapsed)}, ETA {eta}"
        )

    def note(self, text: str) -> None:
        """One event as one line (above the bar on a terminal, a log line otherwise)."""
        if not self.active:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(text)
        else:
            log.info("%s: %s", self.desc, text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.active:
            log.info("%s", self.status())
            self.active = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False
