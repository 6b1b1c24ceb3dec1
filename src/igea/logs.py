"""Readable command-line logs: Python warnings from the libraries become log lines in igea's format.

A library's `warnings.warn` prints `path.py:123: UserWarning: text` plus a line of source, on every process.
The `igea` command routes each warning through `logging` instead, once per text, named after the module that
raised it (`13:02:11 accelerate.state: OMP_NUM_THREADS/MKL_NUM_THREADS unset, ...`), from the main process
only (the other processes log it at DEBUG, shown with --debug). Warnings about what igea already handles are
dropped. Only the command does this (`igea.cli.setup_logging`): igea used as a library leaves Python's
warnings as they are.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

HANDLED_WARNINGS: list[tuple[type[Warning], str]] = [
    # peft 0.21 reads `model.is_gradient_checkpointing`, which transformers 5 deprecated; nothing to act on
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
]
"""(category, message regex) of warnings igea has dealt with; the command does not print them."""


def route_warnings(main_process: bool | None = None) -> None:
    """Log every later Python warning once, under its module's name, in the root logger's format."""
    if main_process is None:
        main_process = os.environ.get("RANK", "0") == "0"
    for category, message in HANDLED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    seen: set[tuple[str, str]] = set()
    level = logging.WARNING if main_process else logging.DEBUG

    def log_warning(message, category, filename, lineno, file=None, line=None) -> None:
        text = " ".join(str(message).split())
        if (category.__name__, text) in seen:
            return
        seen.add((category.__name__, text))
        root = logging.getLogger()
        if root.isEnabledFor(level):
            root.handle(logging.LogRecord(module_name(filename), level, filename, lineno, text, None, None))

    warnings.showwarning = log_warning


def module_name(filename: str) -> str:
    """`transformers.modeling_utils` for .../site-packages/transformers/modeling_utils.py (the longest
    `sys.path` entry that holds the file); the file's name when none does, `<string>` and the like unchanged."""
    if filename.startswith("<"):
        return filename
    path = Path(os.path.abspath(filename))
    roots = sorted({Path(os.path.abspath(p)) for p in sys.path if p}, key=lambda p: len(p.parts), reverse=True)
    for root in roots:
        if path.is_relative_to(root):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            return ".".join(parts) or path.stem
    return path.stem
