"""Errors caused by the user's input or files: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input, a missing file, a bad config: the message names the file, line or field."""
