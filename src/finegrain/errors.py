"""Errors shared across layers (a leaf module: imports nothing from finegrain)."""


UTF16_TEXT = "UTF-16 text: save it as UTF-8"


def looks_utf16(data: bytes) -> bool:
    """Whether ``data`` starts like UTF-16 text: a UTF-16 byte-order mark, or a NUL among its first two bytes
    (UTF-8 text holds no NUL; UTF-16 stores each ASCII character beside one)."""
    return data[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in data[:2]


def non_utf8_text(data: bytes, error: UnicodeDecodeError) -> tuple[int, str]:
    """Where ``data`` stops being UTF-8 and what to do: ``(1, UTF16_TEXT)`` for UTF-16 text, else ``(line,
    "not UTF-8 text (byte 0x.. at column N): save it as UTF-8")``, 1-based."""
    if looks_utf16(data):
        return 1, UTF16_TEXT
    line = data.count(b"\n", 0, error.start) + 1
    column = error.start - data.rfind(b"\n", 0, error.start)
    return line, f"not UTF-8 text (byte 0x{data[error.start]:02x} at column {column}): save it as UTF-8"


class DataError(ValueError):
    """Bad input from the user: a file, a record, a field, a config key or value, a checkpoint, a command-line
    option or a data folder that finegrain cannot use. The message names what is wrong and where (the file,
    the record, the dotted key or the option), so that the ``finegrain`` command reports it as one line
    ``finegrain <command>: error: <message>`` without a traceback. Anything else that escapes a command is a
    bug in finegrain and is shown with its traceback.

    A ``ValueError``, so that code catching ``ValueError`` keeps working. Subclasses take one message argument
    (an error raised in a DataLoader worker is rebuilt in the main process as ``type(error)(message)``)."""


class ConfigError(DataError):
    """A config key is unknown, missing or of the wrong type; the message names the dotted key."""
