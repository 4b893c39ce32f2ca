"""Progress of long work: a tqdm bar on a terminal, whole lines in a log.

A tqdm bar redraws one line with carriage returns. In an Airflow task log, a file or a pipe there is
no terminal: the log shows nothing for minutes, then the whole bar as one very long line. So when
standard error is not a terminal, `progress_bar` returns `LogProgress`, which prints one plain line
every `CXR_PROGRESS_SECONDS` seconds (default 30) and one at the end:

    [epoch 1/16] 120/1,150 batch (10%) 1.9 batch/s, elapsed 1m03s, ETA 9m02s, loss=0.4167 img_s=74

Both take the part of tqdm's interface the pipeline uses: an iterable or `total`, `update`,
`set_postfix`, `close`, `total` and `n`, and `with`.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

PROGRESS_SECONDS = "CXR_PROGRESS_SECONDS"  # seconds between log lines when there is no terminal
DEFAULT_SECONDS = 30.0


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    unit_scale: bool = False,
    initial: float = 0,
    **tqdm_kwargs: Any,
):
    """A tqdm bar when standard error is a terminal (or `disable`d), a `LogProgress` otherwise."""
    if disable or _is_terminal():
        from tqdm.auto import tqdm

        return tqdm(
            iterable,
            total=total,
            desc=desc,
            unit=unit,
            disable=disable,
            unit_scale=unit_scale,
            initial=initial,
            **tqdm_kwargs,
        )
    return LogProgress(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial)


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def interval() -> float:
    """Seconds between lines: CXR_PROGRESS_SECONDS, or 30."""
    raw = os.environ.get(PROGRESS_SECONDS, "")
    try:
        value = float(raw) if raw else DEFAULT_SECONDS
    except ValueError:
        raise ValueError(f"{PROGRESS_SECONDS}={raw!r} is not a number of seconds") from None
    return max(0.0, value)


class LogProgress:
    """Progress as whole lines on standard error, at most one per `every` seconds, and a last one."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: float | None = None,
        desc: str = "",
        unit: str = "it",
        unit_scale: bool = False,
        initial: float = 0,
        every: float | None = None,
        stream=None,
    ):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit, self.unit_scale = total, desc, unit, unit_scale
        self.n = self._start_n = initial
        self.every = interval() if every is None else every
        self.stream = stream
        self.postfix: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._closed = False
        if initial:  # a resumed piece of work says where it starts
            print(f"{self.line(self._start)}, resumed", file=self.stream or sys.stderr, flush=True)

    # tqdm's interface, as used here
    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._emit(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n != self._start_n or self.total:
                self._emit(time.monotonic(), done=True)

    def line(self, now: float | None = None, done: bool = False) -> str:
        """The progress line at `now` (monotonic seconds)."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        rate = (self.n - self._start_n) / elapsed
        sep = "" if self.unit_scale else " "  # 3.00MB, 120 batch
        count = self._amount(self.n) + (sep + self.unit if self.unit_scale or not self.total else "")
        if self.total:
            count += f"/{self._amount(self.total)}{sep}{self.unit} ({100 * self.n / self.total:.0f}%)"
        parts = [f"[{self.desc}] {count}" if self.desc else count, f"{self._amount(rate)}{sep}{self.unit}/s"]
        parts.append(f"elapsed {_duration(elapsed)}")
        if self.total and not done and rate > 0:
            parts.append(f"ETA {_duration((self.total - self.n) / rate)}")
        text = ", ".join(parts)
        if self.postfix:
            text += ", " + " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return text + (" (done)" if done else "")

    def _amount(self, x: float) -> str:
        if self.unit_scale:
            from tqdm import tqdm

            return tqdm.format_sizeof(x)
        return f"{x:,.0f}" if float(x).is_integer() or abs(x) >= 100 else f"{x:.1f}"

    def _emit(self, now: float, done: bool = False) -> None:
        print(self.line(now, done), file=self.stream or sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
