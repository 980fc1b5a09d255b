"""Errors that are the user's to fix. The CLI prints them as one line (no traceback unless --debug)."""


class PrefalignError(Exception):
    """A problem with the user's input: data, config, paths or values. The message is the whole story."""


class DataError(PrefalignError):
    """Bad dataset input; the message names the file, the row and the problem."""


class ConfigError(PrefalignError):
    """Bad configuration: an unknown key or an impossible value."""
