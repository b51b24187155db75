"""Errors shared across layers (a leaf module: imports nothing from finegrain)."""


def non_utf8_text(data: bytes, error: UnicodeDecodeError) -> tuple[int, str]:
    """Where ``data`` stops being UTF-8: ``(line, "not UTF-8 text (byte 0x.. at column N)")``, 1-based."""
    line = data.count(b"\n", 0, error.start) + 1
    column = error.start - data.rfind(b"\n", 0, error.start)
    return line, f"not UTF-8 text (byte 0x{data[error.start]:02x} at column {column})"


class ConfigError(ValueError):
    """A config key is unknown, missing or of the wrong type; the message names the dotted key."""
