"""Errors shared across layers (a leaf module: imports nothing from finegrain)."""


class ConfigError(ValueError):
    """A config key is unknown, missing or of the wrong type; the message names the dotted key."""
