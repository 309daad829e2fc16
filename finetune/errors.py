"""The one exception type users see.

A `FinetuneError` is a user error (bad recipe, bad data row, missing file): the CLI prints its message
alone and exits non-zero; the traceback appears only with `--debug`.
"""


class FinetuneError(Exception):
    """A problem the user can fix. The message names the file, key or row, what is wrong and what to do."""
