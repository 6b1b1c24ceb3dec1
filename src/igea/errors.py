"""The one exception type igea raises for problems a user can fix (bad config, missing file, no network)."""

from __future__ import annotations

import reprlib
from typing import Any

MAX_MESSAGE_CHARS = 1000
"""An error line never grows past this, whatever value it quotes (a YAML alias bomb expands to gigabytes)."""

_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother = 2, 80, 80
_short.maxlist = _short.maxtuple = _short.maxdict = _short.maxset = 4


class IgeaError(Exception):
    """A user-facing error: its message is one line that says what is wrong and what is allowed.

    `exit_code` is what the CLI exits with (2: a usage error the user can fix).
    """

    exit_code = 2


class ConfigError(IgeaError, ValueError):
    """A config value is unknown, of the wrong type or out of range."""


def show(value: Any) -> str:
    """`repr(value)` cut to a readable length, for quoting a user's value in an error line."""
    text = _short.repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def one_line(message: str) -> str:
    """An error message as one line of at most MAX_MESSAGE_CHARS characters."""
    text = " ".join(str(message).split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."
