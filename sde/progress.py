"""Progress bars for every long stage, readable in a terminal and in a log file.

In a terminal a bar redraws in place. Written to a file or a pipe (a batch job's log), the
same bar would leave one line of carriage-return redraws thousands of characters long, so
there each update becomes a line of its own, at most one every ``LOG_INTERVAL_S`` seconds.
``set_quiet(True)`` (``config.quiet``) turns every bar off; the one-line summaries a stage
prints when it ends stay.
"""
from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from tqdm.auto import tqdm

#: Seconds between the lines a bar writes to a log file (a terminal redraws every 0.1 s);
#: ``SDE_PROGRESS_INTERVAL`` (or tqdm's own ``TQDM_MININTERVAL``) sets it.
LOG_INTERVAL_S = float(os.environ.get("SDE_PROGRESS_INTERVAL", os.environ.get("TQDM_MININTERVAL", "30")))
#: Width of a bar's line in a log file.
LOG_COLUMNS = 120

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar off (True) or on (False) for this process."""
    global _quiet
    _quiet = bool(quiet)


class _Lines:
    """A text stream for tqdm that writes each redraw as a line of its own."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip("\n")
        if line.strip():
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(iterable=None, *, desc: str, unit: str = "it", total: float | None = None, disable: bool = False,
        **options: Any) -> tqdm:
    """A tqdm bar on stderr for one stage: ``desc`` names the stage, ``unit`` what it counts
    (images, steps, NFE); off when ``disable`` or quiet."""
    stream = sys.stderr
    # a terminal, or a notebook (tqdm.auto picks its widget there): bars redraw in place
    notebook = any(base.__module__ == "tqdm.notebook" for base in tqdm.__mro__)
    interactive = notebook or (hasattr(stream, "isatty") and stream.isatty())
    settings: dict[str, Any] = {"dynamic_ncols": True} if interactive else {
        "file": _Lines(stream), "mininterval": LOG_INTERVAL_S, "miniters": 1, "ncols": LOG_COLUMNS, "ascii": True}
    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=disable or _quiet, **{**settings, **options})
