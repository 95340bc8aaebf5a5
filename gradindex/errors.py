"""Exception hierarchy.

Every message says what was expected, what came, and how to fix it. The CLI turns
``GradIndexError`` into one line on stderr and exit status 2.
"""

from __future__ import annotations


class GradIndexError(Exception):
    """Base class of every error gradindex raises on purpose."""


class ConfigError(GradIndexError, ValueError):
    """A configuration value or a user input is invalid."""


class StoreMismatchError(GradIndexError):
    """An artifact does not match what it is used with (checkpoint, config, checksum)."""


class ArtifactNotFoundError(GradIndexError, FileNotFoundError):
    """A store, index, checkpoint or input file is missing or incomplete."""


class MissingDependencyError(GradIndexError, ImportError):
    """An optional dependency is not installed."""


class TaskError(GradIndexError):
    """A user task is malformed or returned something of the wrong shape."""


class TaskConsentError(GradIndexError):
    """A store names task code that is not built in, and the user did not consent to running it."""


class ObjectStoreError(GradIndexError):
    """Object storage (``s3://``) could not be reached or refused a request (credentials, bucket, endpoint)."""
