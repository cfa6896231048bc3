"""The project's errors. Each message is already the one line a command prints (`error: LINE`, exit code 2,
no traceback); the commands catch ONE_LINE. This module imports nothing of the repository, so any module may
raise them without loading another.
"""


class UsageError(ValueError):
    """A bad command line or a file of the wrong kind."""


class CheckpointError(ValueError):
    """A weights file or state dict that is not what we expected; the message names the source."""


class DataError(ValueError):
    """A bad dataset on disk; the message names the file and what was expected."""


class WriteError(Exception):
    """A file could not be written, or a folder is in use by another process."""


class Diverged(Exception):
    """Training left the finite numbers or the loss exploded; stopped before it reaches a checkpoint."""


class Stopped(Exception):
    """Raised on every torchrun process when some process failed before training started; its message is that
    process's error."""


ONE_LINE = (CheckpointError, DataError, UsageError, WriteError)


def error_line(err):
    """The one line a command prints for `err`. An error raised in a DataLoader worker arrives with the
    worker's traceback in its message; the user needs its last line only."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in " ".join(text.split()))  # ESC never raw
