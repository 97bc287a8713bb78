"""Shared behaviour of the command-line entry points."""

import sys
from collections.abc import Callable

from m2dist.errors import (
    CheckpointError, ConfigDrift, ConfigError, DataError, NonFiniteTraining, OutputExistsError, RunFolderLocked,
)  # fmt: skip

USER_ERRORS = (
    ConfigError, CheckpointError, DataError, OutputExistsError, FileNotFoundError, ConfigDrift, NonFiniteTraining,
    RunFolderLocked,
)  # fmt: skip


def run_cli(main: Callable[[], None]) -> None:
    """Run `main`; a user error (bad config, bad checkpoint, existing output, a locked run folder,
    diverged training, a resume that changes the model) prints its message and exits with status 2
    instead of a traceback."""
    try:
        main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
