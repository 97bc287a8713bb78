"""The project's error classes, each a mistake the user can fix from its message (the command-line
entry points print it and exit with status 2 instead of a traceback). This module imports nothing
from the project, so any layer can raise any of them."""


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, or impossible."""


class DataError(ValueError):
    """Input data, shards or their manifest are unusable; the message names the file."""


class ManifestMismatchError(DataError):
    """A shard manifest disagrees with the run's config."""


class InputError(DataError):
    """An input line or row cannot be read; the message starts with FILE:LINE."""


class CheckpointError(ValueError):
    """A checkpoint is unreadable, unsafe, or does not match the model."""


class OutputExistsError(FileExistsError):
    """The destination exists and the caller did not ask to overwrite it."""


class RunFolderLocked(RuntimeError):
    """Another live job holds the run folder."""


class NonFiniteTraining(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm, or the weights did."""


class ConfigDrift(ValueError):
    """A resumed run's config changes the model or the data order of its checkpoint."""
