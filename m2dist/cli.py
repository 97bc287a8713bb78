"""Shared behaviour of the command-line entry points."""

import sys
from collections.abc import Callable

from m2dist.checkpoint.io import CheckpointError, OutputExistsError
from m2dist.config import ConfigError
from m2dist.data.manifest import DataError

USER_ERRORS = (ConfigError, CheckpointError, DataError, OutputExistsError, FileNotFoundError)


def run_cli(main: Callable[[], None]) -> None:
    """Run `main`; a user error (bad config, bad checkpoint, existing output) prints one line and
    exits with status 2 instead of a traceback."""
    try:
        main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
