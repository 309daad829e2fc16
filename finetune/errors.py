"""The one exception type users see.

A `FinetuneError` is a user error (bad recipe, bad data row, missing file): the CLI prints its message
alone and exits non-zero; the traceback appears only with `--debug`.
"""


class FinetuneError(Exception):
    """A problem the user can fix. The message names the file, key or row, what is wrong and what to do."""


def shown(value, limit: int = 80) -> str:
    """A value as an error message shows it: its repr (one line, escapes visible), cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
