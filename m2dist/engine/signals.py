"""Stop requests by signal, noted from the moment the entry point starts.

SIGUSR1 (SLURM's warning before the time limit, or a preemption) and SIGTERM (scancel, the time
limit) only set a flag: during start-up and resume the trainer checks it, on every rank together,
between phases and leaves with status 85 (nothing trained, nothing to save); during training it
checkpoints at the next log step and leaves with the same status. Without the handlers, a signal
before the training loop killed the rank with nothing saved and a status that no requeue follows.
This module imports nothing heavy, so that m2dist/train.py installs the handlers first.
"""

import signal

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_received: int | None = None


def _request_stop(signum: int, _frame) -> None:
    global _received
    _received = signum


def install_stop_handlers() -> None:
    """Note SIGUSR1 and SIGTERM instead of dying of them (idempotent)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _request_stop)


def stop_signal() -> int | None:
    """The last stop signal this process got, or None."""
    return _received
