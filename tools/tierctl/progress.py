"""Progress bars on stderr that appear only for steps that take more than a second.

Primitives: `configure(mode)` ("auto" | "always" | "never"), `Progress(label, total,
unit="B")` as a context manager with `advance(n)`; `track(iterable, label, total)`.

Quick steps print nothing, so scripted use and tests stay quiet; "auto" draws only when
stderr is a terminal, because a carriage-return bar in a log file is noise.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Self, TextIO, TypeVar

from tierd.config import format_size

T = TypeVar("T")

SHOW_AFTER_S = 1.0
REDRAW_EVERY_S = 0.1
_BAR_WIDTH = 28

_mode = "auto"


def configure(mode: str) -> None:
    global _mode
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"progress mode must be auto, always or never, not {mode!r}")
    _mode = mode


def _enabled(stream: TextIO) -> bool:
    if _mode == "never":
        return False
    return _mode == "always" or stream.isatty()


class Progress:
    def __init__(
        self, label: str, total: int, *, unit: str = "B", stream: TextIO | None = None
    ) -> None:
        self.label, self.total, self.unit = label, max(total, 0), unit
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._drawn = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fmt(self, n: float) -> str:
        return format_size(int(n)) if self.unit == "B" else f"{int(n)} {self.unit}"

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._start < SHOW_AFTER_S or now - self._last_draw < REDRAW_EVERY_S:
            return
        if not _enabled(self._stream):
            return
        self._last_draw = now
        self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(1.0, self.done / self.total) if self.total else 0.0
        filled = int(frac * _BAR_WIDTH)
        rate = self.done / max(now - self._start, 1e-9)
        rate_s = f"{format_size(int(rate))}/s" if self.unit == "B" else f"{rate:.0f} {self.unit}/s"
        line = (
            f"\r{self.label} [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {frac:4.0%} "
            f"{self._fmt(self.done)}/{self._fmt(self.total)} {rate_s}"
        )
        self._stream.write(line)
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._draw(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False


def track(items: Iterable[T], label: str, total: int, unit: str = "items") -> Iterator[T]:
    """Yield from `items`, advancing a bar by one per item."""
    with Progress(label, total, unit=unit) as bar:
        for item in items:
            yield item
            bar.advance(1)
