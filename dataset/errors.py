"""Errors for bad data inputs. Each message names the file and what to do; callers catch DataError and print it."""


class DataError(ValueError):
    """A data file that is missing, malformed, empty or disagrees with another."""


class MissingDataError(DataError, FileNotFoundError):
    """A list file, database, frame folder or frame file that is not there."""


class EmptyDatabaseError(DataError):
    """An LMDB database with no records: left by a create_lmdb.py run killed before its first commit."""


class DatabaseMismatchError(DataError, LookupError):
    """A list file that disagrees with its LMDB database: videos missing from it, or other frame counts."""
