"""Shared behaviour of the command-line entry points."""

import sys
from collections.abc import Callable

from m2dist.checkpoint.io import CheckpointError
from m2dist.config import ConfigError

USER_ERRORS = (ConfigError, CheckpointError, FileExistsError, FileNotFoundError)


def run_cli(main: Callable[[], None]) -> None:
    """Run `main`; a user error (bad config, bad checkpoint, existing output) prints one line and
    exits with status 2 instead of a traceback."""
    try:
        main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
