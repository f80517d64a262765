"""The one exception class for mistakes a user can fix: a bad option, file, row or run folder.

``clo`` shows a UserError as one line on stderr and exits with 2, as argparse does for a bad
flag; any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input named in the message (an option, a file and line, a run folder), raised before
    anything on disk changes."""


class DataError(UserError):
    """A data row (or a whole source) that cannot be used; the message names the row."""
