"""Long work that shows itself: how far it is, how long it has taken and how long it still needs.

In a terminal a piece of work draws a tqdm bar; in a log file (stderr not a terminal: a scheduler's log, a
pipe) it writes a line with its percent, elapsed time and ETA at least every PROGRESS_SECONDS instead, since a
bar there is a line per redraw. Work over a few seconds says what it is doing when it starts and how long it
took when it ends (`timed`). `progress_bars_off_in_logs` turns the libraries' own bars off in a log file.
`heard_by` lets a run's status file hear where its long work is.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

PROGRESS_SECONDS = 30.0
"""In a log file, the longest a piece of long work goes without a line saying how far it is."""

LISTENERS: list[Callable[[str], None]] = []
"""Who hears where each piece of long work is, at least every PROGRESS_SECONDS (see `heard_by`)."""


def in_log_file() -> bool:
    """True when stderr is not a terminal: progress is written as log lines, not drawn as bars."""
    return not sys.stderr.isatty()


def duration(seconds: float) -> str:
    """Seconds as a person reads them: `0.4 s`, `42 s`, `2m58s`, `1h02m`, `1d17h`."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def count(value: float) -> str:
    """A rate or a count in three significant figures: `812`, `21.1k`, `3.40M`."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


def human_size(size: float) -> str:
    """Bytes as a person reads them: 512 B, 3.4 MB, 1.6 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            break
        size /= 1000
    return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"


class Progress:
    """Progress of `total` units of one piece of work (batches, documents, prompts).

    `bar=True` draws a tqdm bar in a terminal; in a log file (or with `bar=False`, when someone else draws the bar)
    `update` logs `<what>: 45% (18/40 batches) | 1m20s, ETA 1m38s` at most every `every` seconds (default
    PROGRESS_SECONDS).
    `close` logs `<what>: done in 2m58s` when `say_done`. A `total` of 0 or None counts without a percent.
    """

    def __init__(self, what: str, total: int | None, unit: str = "", *, logger: logging.Logger | None = None,
                 bar: bool = True, every: float | None = None, say_done: bool = True) -> None:
        self.what, self.total, self.unit = what, total or None, unit
        self.logger = logger or logging.getLogger(__name__)
        self.every = PROGRESS_SECONDS if every is None else every
        self.say_done = say_done
        self.done = 0
        self.started = self.last_line = time.monotonic()
        self.bar = None
        if bar and not in_log_file():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc=what, unit=f" {unit}" if unit else "it", dynamic_ncols=True,
                            leave=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if not LISTENERS:
                return
        now = time.monotonic()
        per_unit = (now - self.started) / self.done if self.done else 0.0
        if now - self.last_line + per_unit >= self.every:  # the next update would come too late: say it now
            self.last_line = now
            line = f"{self.what}: {self.position(now)}"
            if self.bar is None:
                self.logger.info("%s", line)
            for listener in LISTENERS:
                listener(line)

    def position(self, now: float | None = None) -> str:
        """`45% (18/40 batches) | 1m20s, ETA 1m38s`, or `18 batches | 1m20s` without a total."""
        elapsed = (time.monotonic() if now is None else now) - self.started
        unit = f" {self.unit}" if self.unit else ""
        if not self.total:
            return f"{self.done:,}{unit} | {duration(elapsed)}"
        share = self.done / self.total
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        when = f"{duration(elapsed)}, ETA {duration(eta)}" if eta is not None else duration(elapsed)
        return f"{share:.0%} ({self.done:,}/{self.total:,}{unit}) | {when}"

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def close(self) -> float:
        """End the work (the bar goes); log how long it took when `say_done`; return the seconds."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        seconds = self.elapsed()
        if self.say_done:
            self.logger.info("%s: done in %s", self.what, duration(seconds))
        return seconds

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        elif self.bar is not None:
            self.bar.close()


@contextmanager
def heard_by(listener: Callable[[str], None]) -> Iterator[None]:
    """While the block runs, `listener` hears each piece of long work's `<what>: 45% (18/40 batches) | 1m20s, ETA
    1m38s` at least every PROGRESS_SECONDS, as a log file's lines or beside a terminal's bar: a run's status file
    keeps it, so that `igea status` tells long work (a benchmark, a corpus being read) from a hung run."""
    LISTENERS.append(listener)
    try:
        yield
    finally:
        LISTENERS.remove(listener)


@contextmanager
def timed(logger: logging.Logger, what: str, done: str | None = None) -> Iterator[None]:
    """Log `what` as the work starts and `<done> in 2m58s` when it ends (`done` defaults to `what: done`)."""
    logger.info("%s", what)
    started = time.monotonic()
    yield
    logger.info("%s in %s", done or f"{what}: done", duration(time.monotonic() - started))


@contextmanager
def progress_bars_off_in_logs() -> Iterator[None]:
    """When stderr is not a terminal (a log file, a pipe), the progress bars of datasets (tokenizing),
    transformers (loading and writing weights) and the hub are off while the block runs, as the CLI has them:
    in a log each would be a line per redraw. A bar an environment variable forces on stays on; each switch is
    put back as it was afterwards (this is a library: the caller's settings are its own)."""
    if not in_log_file():
        yield
        return
    import datasets
    from datasets import utils as datasets_bars
    from huggingface_hub import constants
    from huggingface_hub import utils as hub_bars
    from transformers.utils import logging as transformers_logging

    restore = []
    forced_on = datasets.config.HF_DATASETS_DISABLE_PROGRESS_BARS is False  # HF_DATASETS_DISABLE_PROGRESS_BARS=0
    if not forced_on and not datasets_bars.are_progress_bars_disabled():
        datasets_bars.disable_progress_bars()
        restore.append(datasets_bars.enable_progress_bars)
    if constants.HF_HUB_DISABLE_PROGRESS_BARS is not False and transformers_logging.is_progress_bar_enabled():
        hub_was_off = hub_bars.are_progress_bars_disabled()
        transformers_logging.disable_progress_bar()  # transformers' bars, and the hub's with them
        restore.append(hub_bars.disable_progress_bars if hub_was_off else lambda: None)
        restore.append(transformers_logging.enable_progress_bar)
    try:
        yield
    finally:
        for switch_back in reversed(restore):
            switch_back()


def bars_off_in_logs(function: F) -> F:
    """Run `function` with `progress_bars_off_in_logs`: for the public API's loading and preparing functions, so a
    script whose output goes to a file gets no bars there, as the CLI does."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with progress_bars_off_in_logs():
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
