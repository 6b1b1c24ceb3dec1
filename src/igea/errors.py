"""The one exception type igea raises for problems a user can fix (bad config, missing file, no network)."""


class IgeaError(Exception):
    """A user-facing error: its message is one line that says what is wrong and what is allowed."""


class ConfigError(IgeaError, ValueError):
    """A config value is unknown, of the wrong type or out of range."""
