"""Bad input from the user, as opposed to a bug: one base class, so the CLI can tell them apart.

Every user error is one line that names the field (or file, or URI) and what is allowed; ``ofq-ray``
prints it as ``ofq-ray: error: ...`` and exits with status 2. Anything else is a bug and keeps its
traceback. The classes subclass ``ValueError`` so that callers of the library that catch
``ValueError`` keep working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (one line; the CLI exits with status 2)."""


class ConfigError(UserError):
    """A run config, sweep spec or quantization setting that is not allowed."""


class CheckpointError(UserError):
    """A checkpoint or export file that cannot be read or does not fit."""


class DatasetError(UserError):
    """A dataset that is missing, malformed or does not fit the settings."""


class TrackingError(UserError):
    """An MLflow experiment, run, artifact, registered model or URI that does not exist or is malformed."""


class UsageError(UserError):
    """A command-line combination that is not allowed."""


class ClusterError(RuntimeError):
    """Not bad input: the Ray cluster can no longer run what a sweep needs (nodes lost and not back in
    time). One line too; the CLI exits with status 1."""
