"""Errors for bad data inputs. Each message names the file and what to do; callers catch DataError and print it."""


class DataError(ValueError):
    """A data file that is missing, malformed, empty or disagrees with another."""

    def __init__(self, *args):
        # A DataLoader worker's exception reaches the main process re-created as
        # type(exc)("Caught <type> in DataLoader worker process N.\nOriginal Traceback ..."): keep the
        # one-line message (the traceback's last line holds it) and the worker's traceback beside it.
        text = args[0] if len(args) == 1 and isinstance(args[0], str) else ""
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if text.startswith("Caught ") and "\nOriginal Traceback" in text and marker in text:
            self.worker_traceback = text
            args = (text[text.rfind(marker) + len(marker):].rstrip("\n"),)
        super().__init__(*args)


class MissingDataError(DataError, FileNotFoundError):
    """A list file, database, frame folder or frame file that is not there."""


class EmptyDatabaseError(DataError):
    """An LMDB database with no records: left by a create_lmdb.py run killed before its first commit."""


class DatabaseMismatchError(DataError, LookupError):
    """A list file that disagrees with its LMDB database: videos missing from it, or other frame counts."""


class ClipReadError(DataError):
    """A clip that cannot be read while training or evaluating: a damaged record, a missing, empty or undecodable frame.

    The message is one line naming the database or frame folder, the video, the frame and what to do.
    """
