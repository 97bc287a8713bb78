"""MLflow experiment tracking for rank 0, behind one small sink interface.

`build_tracker` returns an `MlflowTracker` on rank 0 and a `NullTracker` on the other ranks or when
tracking is off. The training thread never waits on the network: `log_*` calls only append to
buffers, and one background thread creates (or reopens) the run and sends params, metrics in
batches (`MlflowClient.log_batch`, up to 1000 points a call) and artifacts. When the tracking server
is unreachable or fails, that thread warns once, keeps the metrics (beyond `max_buffered_metrics`
the oldest are dropped and counted), retries every `retry_every_seconds` and sends the backlog when
the server answers again. Nothing is raised into training for tracking.

A resumed job passes the run id stored in its checkpoint to `start` and continues the same run.

The rest of the pipeline logs here too, into the same experiment (the project): `StageRun` is the
synchronous run of a tool (tokenizer, shards, conversion; `tracked_*` are what the tools call),
`shard_dataset` turns a split's manifest into an MLflow dataset, `log_training_inputs` and
`log_final_model` log a training run's datasets and its final model (a pyfunc model from code,
m2dist/mlflow_model.py, registered in the Model Registry), and a lineage file beside a model folder
names the runs and the version it comes from.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import importlib.metadata
import json
import logging
import os
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml

from m2dist.config import REMOTE_SCHEMES, TrackingConfig, parse_streams
from m2dist.data.corpus import default_prepared_dir
from m2dist.data.manifest import read_manifest
from m2dist.data.prepare import prepare_mds
from m2dist.data.tokenizer import (
    DEFAULT_VOCAB,
    file_sha256,
    tokenizer_file,
    train_tokenizer_from_files,
)

logger = logging.getLogger(__name__)

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
RUN_STATUSES: tuple[str, ...] = ("FINISHED", "FAILED", "KILLED")
# MLflow 3 accepts 6000 characters, but older servers and some database backends stop at 500.
MAX_PARAM_VALUE_LENGTH = 500
MAX_KEY_LENGTH = 250
VERSIONED_PACKAGES = ("torch", "deepspeed", "triton", "mosaicml-streaming", "mlflow")
# MLflow's defaults (120 s timeout, 7 retries with exponential backoff) would hold a dead server's
# calls for minutes; the tracker retries by itself, so one short attempt per call is enough.
# Values already exported by the user win.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
# Params, artifacts and texts waiting for the server; beyond it new ones are dropped.
MAX_PENDING_TASKS = 1000
_METRICS_PER_BATCH = 1000
_PARAMS_PER_BATCH = 100
_CLIENT_TOKEN_TAG = "m2dist.client_token"
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def flatten_params(config: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Nested config (a mapping or a dataclass) -> `{"model.hidden_size": "768", ...}`.

    Sequences become JSON (`"[0.9, 0.98]"`), empty mappings `"{}"`; values longer than
    `MAX_PARAM_VALUE_LENGTH` are cut and end with "...".
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        raise ValueError(f"flatten_params: expected a mapping or a dataclass instance, got {type(config).__name__}")
    flat: dict[str, str] = {}
    for key, value in config.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, path))
            continue
        if len(path) > MAX_KEY_LENGTH:
            raise ValueError(f"flatten_params: key {path!r} is longer than MLflow's {MAX_KEY_LENGTH} characters")
        if isinstance(value, Mapping):
            text = "{}"
        elif isinstance(value, (list, tuple)):
            text = json.dumps(list(value), default=str)
        else:
            text = str(value)
        if len(text) > MAX_PARAM_VALUE_LENGTH:
            text = text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."
        flat[path] = text
    return flat


def git_commit(source_dir: Path | None = None) -> tuple[str, bool] | None:
    """(commit, has uncommitted changes) of the git tree holding `source_dir`, or None outside git."""
    source_dir = source_dir or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(source_dir), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(source_dir), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip(), bool(status.stdout.strip())


def collect_run_params(
    config: Mapping[str, Any] | Any, world_size: int, source_dir: Path | None = None
) -> dict[str, str]:
    """The run's params: the flattened resolved config plus `runtime.*` (world size, package
    versions, git commit of the source tree)."""
    if world_size < 1:
        raise ValueError(f"collect_run_params: expected world_size >= 1, got {world_size}")
    params = flatten_params(config)
    params["runtime.world_size"] = str(world_size)
    for package in VERSIONED_PACKAGES:
        try:
            params[f"runtime.version.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            params[f"runtime.version.{package}"] = "not installed"
    commit = git_commit(source_dir)
    if commit is not None:
        params["runtime.git_commit"] = commit[0]
        params["runtime.git_dirty"] = str(commit[1])
    return params


def plot_loss_curve(
    steps: Sequence[int], losses: Sequence[float], path: str | Path, title: str = "training loss"
) -> Path:
    """Write a PNG of loss against step (matplotlib's Agg renderer, no display needed); returns its path."""
    if len(steps) != len(losses):
        raise ValueError(f"plot_loss_curve: expected as many steps as losses, got {len(steps)} and {len(losses)}")
    # Figure without pyplot: no global backend switch and no GUI, whatever MPLBACKEND says.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=110, layout="tight")
    axes = figure.add_subplot()
    axes.plot(list(steps), list(losses), linewidth=1.2)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def resolve_tracking_uri(config: TrackingConfig, output_dir: str | Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment or None for the server's default).

    The URI is `config.tracking_uri`, else `$MLFLOW_TRACKING_URI`, else a SQLite store in the output
    directory. A database store keeps its artifacts in `<output_dir>/mlruns`.
    """
    output_dir = Path(output_dir).resolve()
    uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        uri = f"sqlite:///{output_dir / 'mlflow.db'}"
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    artifact_location = (output_dir / "mlruns").as_uri() if scheme in _DATABASE_SCHEMES else None
    return uri, artifact_location


class Tracker(abc.ABC):
    """Where the engine's params, metrics and artifacts go. Calls never raise for tracking failures."""

    @property
    @abc.abstractmethod
    def run_id(self) -> str | None:
        """The MLflow run id to store in checkpoints (None while unknown)."""

    @abc.abstractmethod
    def start(self, run_name: str, params: Mapping[str, str], resume_run_id: str | None = None) -> str | None:
        """Create the run, or reopen `resume_run_id`, and log `params`; returns the run id."""

    @abc.abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar metrics at `step`; returns at once."""

    @abc.abstractmethod
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or a folder; it must stay in place until `close`."""

    @abc.abstractmethod
    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        """Store `dictionary` (copied now) as JSON or YAML, chosen by `artifact_file`'s suffix."""

    @abc.abstractmethod
    def log_text(self, text: str, artifact_file: str) -> None:
        """Store `text` as the artifact `artifact_file`."""

    @abc.abstractmethod
    def submit(self, what: str, call: Callable[[Any, str], None]) -> None:
        """Run `call(client, run_id)` with the tracker's MlflowClient once the run exists, in order
        with the other uploads, again after a transient failure; `what` names it in warnings."""

    @property
    def failure(self) -> str | None:
        """Why tracking failed (the server unreachable at the end, a rejected run), else None."""
        return None

    @abc.abstractmethod
    def flush(self, timeout: float = 30.0) -> bool:
        """Try to send everything now; True when nothing is left to send within `timeout` seconds."""

    @abc.abstractmethod
    def close(self, status: RunStatus = "FINISHED") -> None:
        """Send what is left (for at most `close_timeout_seconds`) and end the run with `status`."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


class NullTracker(Tracker):
    """Tracks nothing: ranks other than 0, and `tracking.enabled=false`."""

    @property
    def run_id(self) -> str | None:
        return None

    def start(self, run_name: str, params: Mapping[str, str], resume_run_id: str | None = None) -> str | None:
        # Hand back the id it was given, so a checkpoint keeps it across a job without tracking.
        return resume_run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def submit(self, what: str, call: Callable[[Any, str], None]) -> None:
        pass

    def flush(self, timeout: float = 30.0) -> bool:
        return True

    def close(self, status: RunStatus = "FINISHED") -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"close: expected status in {RUN_STATUSES}, got {status!r}")


@lru_cache(maxsize=1024)
def mlflow_key(key: str) -> str:
    """`key` as MLflow accepts a param or metric name: other characters than letters, digits, "_",
    "/", ".", "-" and space become "_", empty and relative path parts are dropped, and it is cut to
    MAX_KEY_LENGTH."""
    # MLflow rejects (and so drops the whole batch for) names outside [/\w.\- :] or with empty or
    # relative path parts.
    cleaned = re.sub(r"[^/\w.\- ]", "_", str(key))
    cleaned = "/".join(part for part in cleaned.split("/") if part not in ("", ".", ".."))
    return cleaned[:MAX_KEY_LENGTH] or "_"


def _is_permanent(err: BaseException) -> bool:
    """True for errors a retry cannot fix (a rejected value, a missing run or file)."""
    if isinstance(err, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return True
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.get_http_status_code() in (400, 404, 409)


def _reason(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= 400 else text[:397] + "..."


@dataclass
class _Task:
    # What the task does, for warnings ("artifact config.yaml").
    what: str
    # The call to make with the MlflowClient; run again after a transient failure.
    call: Callable[[Any], None]
    # Never dropped when the queue is full; a permanent failure turns tracking off for the job.
    essential: bool = False


class MlflowTracker(Tracker):
    """Logs to one MLflow run from a background thread; see the module docstring."""

    def __init__(self, config: TrackingConfig, tracking_uri: str, artifact_location: str | None = None) -> None:
        self._config = config
        self._uri = tracking_uri
        self._artifact_location = artifact_location
        for name, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._first_attempt_done = threading.Event()
        # (key, value, timestamp in ms, step), oldest first.
        self._metrics: collections.deque[tuple[str, float, int, int]] = collections.deque()
        self._metrics_in_flight = 0
        self._tasks: collections.deque[_Task] = collections.deque()
        self._dropped_metrics = 0
        self._dropped_tasks = 0
        self._warned: set[str] = set()
        self._run_id: str | None = None
        self._run_open = False
        self._create_attempts = 0
        self._client_token = uuid.uuid4().hex
        self._client: Any = None
        self._thread: threading.Thread | None = None
        self._next_attempt = 0.0
        self._failing = False
        self._failure: str | None = None
        self._failed_attempts = 0
        self._disabled = False
        self._closing = False
        self._close_deadline = 0.0
        self._closed = False

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def tracking_uri(self) -> str:
        return self._uri

    @property
    def failure(self) -> str | None:
        """The last failure while the server is failing or tracking was turned off, else None."""
        return self._failure if (self._failing or self._disabled) else None

    @property
    def dropped_metrics(self) -> int:
        """Metric points dropped because the buffer was full while the server was unreachable."""
        return self._dropped_metrics

    @property
    def pending_metrics(self) -> int:
        """Metric points buffered or being sent."""
        with self._lock:
            return len(self._metrics) + self._metrics_in_flight

    def start(self, run_name: str, params: Mapping[str, str], resume_run_id: str | None = None) -> str | None:
        """Create or reopen the run in the background and wait for it at most `start_timeout_seconds`.

        Returns the run id; when the server does not answer in time this is `resume_run_id` (None for a
        new run) and the run is created later, read `run_id` when saving a checkpoint.
        """
        if self._thread is not None:
            raise RuntimeError("MlflowTracker.start: the run was started already")
        params = {mlflow_key(key): str(value)[:MAX_PARAM_VALUE_LENGTH] for key, value in params.items()}
        self._run_id = resume_run_id
        self._enqueue(
            _Task(f"open the run in {self._uri}", lambda client: self._open_run(client, run_name, resume_run_id), True)
        )
        self._enqueue(_Task("params", lambda client: self._log_params(client, params)))
        self._thread = threading.Thread(target=self._loop, name="m2dist-mlflow", daemon=True)
        self._thread.start()
        self._first_attempt_done.wait(self._config.start_timeout_seconds)
        return self._run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self._closed or self._disabled:
            return
        try:
            timestamp = int(time.time() * 1000)
            points = []
            for key, value in metrics.items():
                try:
                    points.append((mlflow_key(key), float(value), timestamp, int(step)))
                except (TypeError, ValueError):
                    self._warn_once(f"value:{key}", "MLflow tracking: metric %r is %r, skipped", key, value)
            with self._lock:
                for point in points:
                    self._metrics.append(point)
                self._trim_metrics()
                full = len(self._metrics) >= self._config.flush_every_entries
            if full:
                self._wake.set()
        except Exception as err:  # never into the training loop
            self._warn_once("log_metrics", "MLflow tracking: log_metrics failed (%s)", _reason(err))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path).resolve()
        if not path.exists():
            self._warn_once(f"missing:{path}", "MLflow tracking: artifact %s does not exist, skipped", path)
            return
        local = str(path)
        if path.is_dir():
            self._enqueue(
                _Task(f"artifact {path}", lambda client: client.log_artifacts(self._run_id, local, artifact_path))
            )
        else:
            self._enqueue(
                _Task(f"artifact {path}", lambda client: client.log_artifact(self._run_id, local, artifact_path))
            )

    def log_dict(self, dictionary: Mapping[str, Any], artifact_file: str) -> None:
        try:
            if artifact_file.endswith((".yaml", ".yml")):
                text = yaml.safe_dump(json.loads(json.dumps(dictionary, default=str)), sort_keys=False)
            else:
                text = json.dumps(dictionary, indent=2, default=str)
        except (TypeError, ValueError) as err:
            self._warn_once(f"dict:{artifact_file}", "MLflow tracking: %s not serialisable (%s)", artifact_file, err)
            return
        self.log_text(text, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._enqueue(
            _Task(f"artifact {artifact_file}", lambda client: client.log_text(self._run_id, text, artifact_file))
        )

    def submit(self, what: str, call: Callable[[Any, str], None]) -> None:
        self._enqueue(_Task(what, lambda client: call(client, self._run_id)))

    def flush(self, timeout: float = 30.0, stop_on_failure: bool = False) -> bool:
        """Also returns False, without waiting longer, at the first failure when `stop_on_failure`."""
        if self._thread is None or not self._thread.is_alive():
            return not self._has_work()
        deadline = time.monotonic() + timeout
        failures = self._failed_attempts
        self._next_attempt = 0.0
        self._wake.set()
        while self._has_work():
            if time.monotonic() >= deadline or (stop_on_failure and self._failed_attempts > failures):
                return False
            time.sleep(0.02)
        return True

    def close(self, status: RunStatus = "FINISHED") -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"close: expected status in {RUN_STATUSES}, got {status!r}")
        if self._closed:
            return
        if self._thread is None:
            self._closed = True
            return
        end_run = _Task(f"end the run as {status}", lambda client: client.set_terminated(self._run_id, status), True)
        self._enqueue(end_run)
        self._closed = True
        with self._lock:
            self._closing = True
            self._close_deadline = time.monotonic() + self._config.close_timeout_seconds
        self._next_attempt = 0.0
        self._wake.set()
        self._thread.join(self._config.close_timeout_seconds + 2.0)
        with self._lock:
            unsent_metrics = len(self._metrics) + self._metrics_in_flight
            unsent_tasks = len(self._tasks)
        if not self._disabled and (unsent_metrics or unsent_tasks):
            logger.warning(
                "MLflow tracking: closing with %d metric points and %d params/artifacts/status updates not "
                "sent to %s after %.0f s",
                unsent_metrics,
                unsent_tasks,
                self._uri,
                self._config.close_timeout_seconds,
            )
        if self._dropped_metrics:
            logger.warning(
                "MLflow tracking: %d metric points were dropped while %s was unreachable (buffer of %d)",
                self._dropped_metrics,
                self._uri,
                self._config.max_buffered_metrics,
            )

    def _enqueue(self, task: _Task) -> None:
        if self._disabled or self._closed:
            return
        with self._lock:
            if len(self._tasks) >= MAX_PENDING_TASKS and not task.essential:
                self._dropped_tasks += 1
                full = True
            else:
                self._tasks.append(task)
                full = False
        if full:
            self._warn_once("tasks", "MLflow tracking: %d uploads waiting, %s dropped", MAX_PENDING_TASKS, task.what)
        self._wake.set()

    def _trim_metrics(self) -> None:
        """Drop the oldest points beyond the bound; call with the lock held."""
        excess = len(self._metrics) - self._config.max_buffered_metrics
        if excess <= 0:
            return
        for _ in range(excess):
            self._metrics.popleft()
        self._dropped_metrics += excess
        self._warn_once(
            "dropping",
            "MLflow tracking: more than %d metric points waiting for %s; dropping the oldest",
            self._config.max_buffered_metrics,
            self._uri,
        )

    def _has_work(self) -> bool:
        with self._lock:
            return not self._disabled and bool(self._tasks or self._metrics or self._metrics_in_flight)

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def _loop(self) -> None:
        while True:
            with self._lock:
                closing, deadline = self._closing, self._close_deadline
            now = time.monotonic()
            if closing:
                wait = max(0.0, min(max(self._next_attempt, now), deadline) - now)
            elif self._next_attempt > now:
                wait = self._next_attempt - now
            else:
                wait = self._config.flush_every_seconds
            self._wake.wait(wait)
            self._wake.clear()
            with self._lock:
                closing, deadline = self._closing, self._close_deadline
            if time.monotonic() >= self._next_attempt and self._has_work():
                done = self._attempt()
                retry = self._config.retry_every_seconds
                self._next_attempt = 0.0 if done else time.monotonic() + (min(retry, 1.0) if closing else retry)
            self._first_attempt_done.set()
            if closing and (not self._has_work() or time.monotonic() >= deadline):
                return

    def _attempt(self) -> bool:
        """Run the pending tasks, then send the buffered metrics; False after a transient failure."""
        try:
            if self._client is None:
                from mlflow import MlflowClient

                self._client = MlflowClient(self._uri)
            while True:
                with self._lock:
                    task = self._tasks[0] if self._tasks else None
                if task is None:
                    break
                try:
                    task.call(self._client)
                except Exception as err:
                    if not _is_permanent(err):
                        raise
                    if task.essential:
                        self._disable(f"could not {task.what}: {_reason(err)}")
                        return True
                    self._warn_once(
                        f"rejected:{task.what}", "MLflow tracking: %s rejected, skipped (%s)", task.what, _reason(err)
                    )
                with self._lock:
                    self._tasks.popleft()
            if self._run_open:
                self._send_metrics()
        except Exception as err:
            self._failure = _reason(err)
            self._failed_attempts += 1
            if not self._failing:
                self._failing = True
                logger.warning(
                    "MLflow tracking at %s failed (%s); training goes on, metrics are kept (up to %d points) and "
                    "sent when the server answers again (tried every %g s)",
                    self._uri,
                    _reason(err),
                    self._config.max_buffered_metrics,
                    self._config.retry_every_seconds,
                )
            return False
        if self._failing:
            self._failing = False
            logger.info("MLflow tracking at %s answers again; buffered metrics sent", self._uri)
        return True

    def _send_metrics(self) -> None:
        from mlflow.entities import Metric

        while True:
            with self._lock:
                batch = [self._metrics.popleft() for _ in range(min(len(self._metrics), _METRICS_PER_BATCH))]
                self._metrics_in_flight = len(batch)
            if not batch:
                return
            try:
                self._client.log_batch(
                    self._run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in batch], synchronous=True
                )
            except Exception as err:
                permanent = _is_permanent(err)
                with self._lock:
                    self._metrics_in_flight = 0
                    if not permanent:
                        self._metrics.extendleft(reversed(batch))
                        self._trim_metrics()
                if not permanent:
                    raise
                self._warn_once(
                    "rejected:metrics",
                    "MLflow tracking: %d metric points rejected, dropped (%s)",
                    len(batch),
                    _reason(err),
                )
                continue
            with self._lock:
                self._metrics_in_flight = 0

    def _disable(self, reason: str) -> None:
        logger.warning("MLflow tracking off for this job: %s", reason)
        self._failure = reason
        with self._lock:
            self._disabled = True
            self._tasks.clear()
            self._metrics.clear()

    def _open_run(self, client: Any, run_name: str, resume_run_id: str | None) -> None:
        from mlflow.exceptions import MlflowException

        if self._artifact_location and self._uri.startswith("sqlite:///"):
            Path(self._uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        run = None
        if resume_run_id:
            try:
                run = client.get_run(resume_run_id)
            except MlflowException as err:
                if err.get_http_status_code() not in (400, 404):
                    raise
            if run is None or run.info.lifecycle_stage != "active":
                logger.warning(
                    "MLflow tracking: run %s to resume is not in %s (or deleted); starting a new run",
                    resume_run_id,
                    self._uri,
                )
                run = None
            else:
                client.update_run(resume_run_id, status="RUNNING")
        if run is None:
            experiment_id = self._experiment_id(client)
            # A create_run that timed out may have reached the server: look for it before a second one.
            if self._create_attempts:
                token_filter = f"tags.`{_CLIENT_TOKEN_TAG}` = '{self._client_token}'"
                found = client.search_runs([experiment_id], filter_string=token_filter, max_results=1)
                run = found[0] if found else None
            self._create_attempts += 1
            if run is None:
                run = client.create_run(experiment_id, run_name=run_name, tags={_CLIENT_TOKEN_TAG: self._client_token})
        self._run_id = run.info.run_id
        self._run_open = True

    def _experiment_id(self, client: Any) -> str:
        return experiment_id(client, self._config.experiment, self._artifact_location)

    def _log_params(self, client: Any, params: dict[str, str]) -> None:
        """Log params the run does not have yet; on a resumed run, changed values become tags
        `resumed.<key>` (MLflow params cannot change)."""
        from mlflow.entities import RunTag

        existing = client.get_run(self._run_id).data.params
        log_params(client, self._run_id, {k: v for k, v in params.items() if k not in existing})
        changed = [RunTag(f"resumed.{k}"[:MAX_KEY_LENGTH], v) for k, v in params.items() if existing.get(k, v) != v]
        for start in range(0, len(changed), _PARAMS_PER_BATCH):
            client.log_batch(self._run_id, tags=changed[start : start + _PARAMS_PER_BATCH], synchronous=True)
        if "runtime.git_commit" in params:
            client.set_tag(self._run_id, "mlflow.source.git.commit", params["runtime.git_commit"])


def experiment_id(client: Any, name: str, artifact_location: str | None) -> str:
    """The id of MLflow experiment `name` in `client`'s store: restored if it was deleted, created
    (with `artifact_location`) if missing, also when another job creates it at the same moment."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage != "active":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as err:
        # Another job created it in between.
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise err
        return experiment.experiment_id


def log_params(client: Any, run_id: str, params: Mapping[str, str]) -> None:
    """Log `params` on run `run_id` in batches of MLflow's size, keys made valid (`mlflow_key`)
    and values cut to MAX_PARAM_VALUE_LENGTH."""
    from mlflow.entities import Param

    items = [Param(mlflow_key(k), str(v)[:MAX_PARAM_VALUE_LENGTH]) for k, v in params.items()]
    for start in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + _PARAMS_PER_BATCH], synchronous=True)


def log_metrics(client: Any, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log `metrics` at `step` on run `run_id` in one call, stamped now, keys made valid."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(mlflow_key(k), float(v), now, step) for k, v in metrics.items()]
    client.log_batch(run_id, metrics=items, synchronous=True)


def build_tracker(tracking_config: TrackingConfig, rank: int, output_dir: str | Path) -> Tracker:
    """An `MlflowTracker` on rank 0 when tracking is enabled, else a `NullTracker`."""
    if not tracking_config.enabled or rank != 0:
        return NullTracker()
    uri, artifact_location = resolve_tracking_uri(tracking_config, output_dir)
    return MlflowTracker(tracking_config, uri, artifact_location)


# Lineage across the pipeline. Every stage's run carries `m2dist.stage`; the links between stages are
# tags holding run ids, the tokenizer's SHA-256, and MLflow datasets named and digested from the
# shard manifests.
STAGE_TAG = "m2dist.stage"
TOKENIZER_SHA_TAG = "m2dist.tokenizer_sha256"
TRAINING_RUN_TAG = "m2dist.training_run_id"
SOURCE_RUN_TAG = "m2dist.source_run_id"
SOURCE_PATH_TAG = "m2dist.source_path"
SOURCE_MODEL_TAG = "m2dist.source_model"
SOURCE_MODEL_NAME_TAG = "m2dist.source_model_name"
SOURCE_MODEL_VERSION_TAG = "m2dist.source_model_version"
REGISTERED_VERSION_TAG = "m2dist.registered_model_version"
DATASET_CONTEXT_TAG = "mlflow.data.context"
# Beside a model folder (a release or a downloaded registered model): which runs and version it comes from.
LINEAGE_FILE = "mlflow_lineage.json"
# Where a run keeps its MLflow model.
MODEL_ARTIFACT_PATH = "model"
MODEL_URI_PREFIX = "models:/"
_MODEL_CODE = Path(__file__).resolve().with_name("mlflow_model.py")
_MODEL_REQUIREMENTS = ("torch", "safetensors", "numpy", "mlflow")


def readable_run_name(*parts: str, when: float | None = None) -> str:
    """`parts` joined by "-" with the local date and time: "m2-bert-80M-110M-L128-20261202-061530"."""
    return "-".join([str(p) for p in parts if p] + [time.strftime("%Y%m%d-%H%M%S", time.localtime(when))])


def human_count(count: int) -> str:
    """110_000_000 -> "110M", 9_612_000 -> "9.61M", 512 -> "512"."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(count)


def training_run_name(config: Any, num_parameters: int) -> str:
    """Config name, parameter count, sequence length and date: "debug-9.61M-L128-20261202-061530"."""
    seq_len = config.seq_len
    return readable_run_name(config.name, human_count(num_parameters), f"L{seq_len}")


@dataclass(frozen=True)
class ShardDataset:
    """One split of MDS shards as an MLflow dataset: named after its folder, digested from its manifest."""

    # "<shard set>/<split>", e.g. "c4-128/train".
    name: str
    # First 32 hex digits of the SHA-256 of the manifest's canonical JSON.
    digest: str
    # Where the split is: a file:// URI of the local folder, or the s3:// URL.
    uri: str
    # Columns of a sample (JSON).
    schema: str
    # Counts and how the tokens were made (JSON).
    profile: str

    def entity(self) -> Any:
        from mlflow.entities import Dataset

        source_type = self.uri.split(":", 1)[0] if not self.uri.startswith("file:") else "local"
        return Dataset(self.name, self.digest, source_type, json.dumps({"uri": self.uri}), self.schema, self.profile)


def manifest_digest(manifest: Any) -> str:
    """The digest of a shard split: the manifest records the tokenizer, layout and counts."""
    import hashlib

    return hashlib.sha256(manifest.to_json().encode("utf-8")).hexdigest()[:32]


def shard_dataset(location: str | Path, manifest: Any) -> ShardDataset:
    """The MLflow dataset of the split at `location` (a local folder or an s3:// URL) with `manifest`."""
    location = str(location).rstrip("/")
    uri = location if location.startswith(REMOTE_SCHEMES) else Path(location).resolve().as_uri()
    name = "/".join(uri.rstrip("/").split("/")[-2:])
    schema = {"input_ids": f"ndarray:{manifest.dtype}", "max_len": manifest.max_len, "mode": manifest.mode}
    profile = {
        **dataclasses.asdict(manifest.counts),
        "tokenizer_kind": manifest.tokenizer_kind,
        "tokenizer_sha256": manifest.tokenizer_sha256,
        "vocab_size": manifest.vocab_size,
    }
    return ShardDataset(name, manifest_digest(manifest), uri, json.dumps(schema), json.dumps(profile))


def _dataset_inputs(datasets: Sequence[tuple[ShardDataset, str, Mapping[str, str]]]) -> list[Any]:
    from mlflow.entities import DatasetInput, InputTag

    return [
        DatasetInput(d.entity(), [InputTag(DATASET_CONTEXT_TAG, context), *(InputTag(k, v) for k, v in extra.items())])
        for d, context, extra in datasets
    ]


def training_datasets(config: Any) -> list[tuple[ShardDataset, str, dict[str, str]]]:
    """(dataset, context "train"/"validation", extra input tags) of each stream a run reads: data.train
    and data.val, or the embedded corpus' splits. Remote manifests are downloaded."""
    import tempfile

    data = config.data
    if data.train:
        streams = [(s, "train") for s in parse_streams(data.train)]
        streams += [(s, "validation") for s in parse_streams(data.val)]
        where = [(s.path, context, {} if s.proportion is None else {"m2dist.proportion": str(s.proportion)})
                 for s, context in streams]  # fmt: skip
    else:
        seq_len = config.seq_len
        tokenizer = tokenizer_file(data.tokenizer)
        root = Path(data.prepared_dir) if data.prepared_dir else default_prepared_dir(seq_len, tokenizer, data.embedded_mode)
        where = [(str(root / "train"), "train", {}), (str(root / "val"), "validation", {})]
    with tempfile.TemporaryDirectory(prefix="m2dist-manifests-") as tmp:
        return [
            (shard_dataset(path, read_manifest(path, Path(tmp) / str(index))), context, extra)
            for index, (path, context, extra) in enumerate(where)
        ]


def log_training_inputs(tracker: Tracker, config: Any) -> None:
    """Log the run's input datasets (the shard splits, context train/validation), its stage and its
    tokenizer's SHA-256, from the tracker's thread. A manifest that cannot be read is warned about."""
    if isinstance(tracker, NullTracker):
        return
    tokenizer = tokenizer_file(config.data.tokenizer)

    def log(client: Any, run_id: str) -> None:
        from mlflow.entities import RunTag

        tags = {STAGE_TAG: "pretrain", "m2dist.config_name": config.name}
        try:
            tags[TOKENIZER_SHA_TAG] = file_sha256(tokenizer)
            datasets = training_datasets(config)
        except (OSError, ValueError) as err:
            logger.warning("MLflow tracking: input datasets not logged (%s)", _reason(err))
            datasets = []
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
        if datasets:
            client.log_inputs(run_id, datasets=_dataset_inputs(datasets))

    tracker.submit("the input datasets", log)


def registered_model_name(config: Any) -> str:
    """tracking.registered_model with "{name}" replaced by the config's name ("" = do not register)."""
    return config.tracking.registered_model.replace("{name}", config.name)


def save_mlflow_model(release_dir: str | Path, path: str | Path) -> Path:
    """Write an MLflow pyfunc model at `path` whose artifact `release` is a copy of the release folder
    and whose code is m2dist/mlflow_model.py (a model from code: no pickle). Replaces `path`."""
    import shutil

    import mlflow

    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    requirements = []
    for package in _MODEL_REQUIREMENTS:
        try:
            requirements.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            requirements.append(package)
    mlflow.pyfunc.save_model(
        str(path), python_model=str(_MODEL_CODE), artifacts={"release": str(release_dir)}, pip_requirements=requirements
    )
    return path


def release_in_mlflow_model(model_dir: str | Path) -> Path:
    """The release folder inside an MLflow model written by `save_mlflow_model`."""
    model_dir = Path(model_dir)
    meta = yaml.safe_load((model_dir / "MLmodel").read_text())
    try:
        relative = meta["flavors"]["python_function"]["artifacts"]["release"]["path"]
    except (KeyError, TypeError):
        raise ValueError(f"{model_dir}: not an m2dist MLflow model (no artifact 'release' in its MLmodel)") from None
    return model_dir / relative


def register_model_version(client: Any, name: str, run_id: str, tags: Mapping[str, str]) -> str:
    """Register the run's `model` artifact as a new version of `name` (created if missing); the
    version already made from this run if there is one (a retried call). Returns the version."""
    from mlflow.exceptions import MlflowException

    existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    if existing:
        return str(existing[0].version)
    try:
        client.create_registered_model(name, description="M2-BERT models trained and converted with m2dist")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name, f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}", run_id=run_id, tags=dict(tags), await_creation_for=0
    )
    client.set_tag(run_id, REGISTERED_VERSION_TAG, f"{name}/{version.version}")
    return str(version.version)


def write_lineage(folder: str | Path, **fields: str | None) -> None:
    """Merge `fields` (None values left out) into the folder's lineage file."""
    path = Path(folder) / LINEAGE_FILE
    lineage = read_lineage(folder)
    lineage.update({k: v for k, v in fields.items() if v})
    if not lineage:
        return
    path.write_text(json.dumps(lineage, indent=1, sort_keys=True) + "\n")


def read_lineage(folder: str | Path) -> dict[str, str]:
    """The lineage file of a model folder, {} when there is none."""
    path = Path(folder) / LINEAGE_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        logger.warning("%s: not valid JSON, ignored", path)
        return {}


def log_final_model(
    tracker: Tracker, config: Any, output_dir: str | Path, upload_timeout: float = 3600.0
) -> Path | None:
    """Consolidate the run's last checkpoint into <output_dir>/release, log it as the MLflow model of
    the run and register it as a version of `registered_model_name(config)`. Waits for the upload
    (at most `upload_timeout` s, less when the server fails). Returns the release folder; None when
    tracking is off, `tracking.log_model` is false or the conversion failed (warned)."""
    if isinstance(tracker, NullTracker) or not config.tracking.log_model:
        return None
    # Imported here: the checkpoint modules import torch, which the data tools and their spawned
    # workers (tools/prepare_mds.py, tools/train_tokenizer.py) that import this module do without.
    from m2dist.checkpoint.convert import convert_checkpoint

    output_dir = Path(output_dir)
    try:
        release = convert_checkpoint(output_dir, output_dir / "release", "release", overwrite=True)
        model_dir = save_mlflow_model(release, output_dir / "mlflow_model")
    except Exception as err:  # the weights are safe in the checkpoint; tools/convert_checkpoint.py can do it later
        logger.warning("MLflow tracking: the final model was not logged (%s)", _reason(err))
        return None
    uri = getattr(tracker, "tracking_uri", "")
    write_lineage(release, tracking_uri=uri, training_run_id=tracker.run_id, source_run_id=tracker.run_id)
    tracker.submit(
        "the final model", lambda client, run_id: client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT_PATH)
    )
    name = registered_model_name(config)
    if name:

        def register(client: Any, run_id: str) -> None:
            tokenizer = tokenizer_file(config.data.tokenizer)
            tags = {TRAINING_RUN_TAG: run_id, TOKENIZER_SHA_TAG: file_sha256(tokenizer), "m2dist.config_name": config.name}
            version = register_model_version(client, name, run_id, tags)
            write_lineage(
                release, training_run_id=run_id, source_run_id=run_id, registered_model=name, model_version=version
            )
            logger.info("MLflow: registered %s%s/%s from run %s", MODEL_URI_PREFIX, name, version, run_id)

        tracker.submit(f"a version of the registered model {name}", register)
    if isinstance(tracker, MlflowTracker):
        tracker.flush(upload_timeout, stop_on_failure=True)
    return release


def final_model_summary(release: str | Path) -> str:
    """The line a training job prints about its final model: where it is, and its registered version."""
    lineage = read_lineage(release)
    if lineage.get("model_version"):
        version = f"{MODEL_URI_PREFIX}{lineage['registered_model']}/{lineage['model_version']}"
        return f"final model {release}, registered as {version}"
    return f"final model {release}"


def tool_tracking_uri(
    tracking_uri: str | None = None, default_dir: str | Path | None = None, fallback_uri: str | None = None
) -> tuple[str, str | None]:
    """(URI, artifact location) for a tool's run: `tracking_uri`, else $MLFLOW_TRACKING_URI, else
    `fallback_uri`, else a SQLite store `mlflow.db` in `default_dir` or the working directory. A new
    experiment of a SQLite store keeps its artifacts in `mlruns/` beside the database."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "") or fallback_uri or ""
    if uri.startswith("sqlite:///"):
        # A new experiment in a SQLite store keeps its artifacts beside the database.
        return uri, Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlruns").as_uri()
    return resolve_tracking_uri(TrackingConfig(tracking_uri=uri), default_dir or Path.cwd())


def add_tracking_arguments(parser: Any) -> None:
    """--tracking-uri, --experiment and --no-tracking for a tool's argparse parser."""
    group = parser.add_argument_group("MLflow tracking")
    group.add_argument(
        "--tracking-uri", default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)",
    )  # fmt: skip
    group.add_argument("--experiment", default=TrackingConfig.experiment, help="project name: the MLflow experiment")
    group.add_argument("--no-tracking", action="store_true", help="log nothing to MLflow")


class StageRun:
    """One MLflow run of a pipeline tool (tokenizer, shards, conversion), logged from the calling
    process as the work goes. The first failed call warns, turns tracking off for the rest of the run
    and is kept in `failure`; the tool's work is never stopped by tracking. `summary()` is the line
    a tool prints at the end: where the run is, or that tracking failed."""

    def __init__(
        self,
        stage: str,
        tracking_uri: str | None = None,
        experiment: str = TrackingConfig.experiment,
        enabled: bool = True,
        default_dir: str | Path | None = None,
        fallback_uri: str | None = None,
    ) -> None:
        if not experiment.strip():
            raise ValueError(f"StageRun: expected a non-empty experiment name, got {experiment!r}")
        self.stage = stage
        self.experiment = experiment
        self.enabled = enabled
        self.uri, self._artifact_location = tool_tracking_uri(tracking_uri, default_dir, fallback_uri)
        self.run_id: str | None = None
        self.failure: str | None = None
        # "models:/<name>/<version>" once a model version is registered.
        self.registered = ""
        self._client: Any = None
        for name, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)

    @classmethod
    def from_args(cls, stage: str, args: Any, fallback_uri: str | None = None) -> StageRun:
        """From the arguments of `add_tracking_arguments`."""
        return cls(stage, args.tracking_uri, args.experiment, not args.no_tracking, fallback_uri=fallback_uri)

    def call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """`fn(client)`, or None once tracking is off or when it fails (then warns and turns it off)."""
        if not self.enabled or (self._client is None and what != "create the run"):
            return None
        try:
            return fn(self._client)
        except Exception as err:  # tracking never stops the tool's work
            self.failure = f"could not {what} in {self.uri}: {_reason(err)}"
            logger.warning("MLflow tracking failed, off for the rest of this %s run: %s", self.stage, self.failure)
            self.enabled = False
            return None

    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> str | None:
        """Create the run in the experiment with `params` and the stage tag; returns its id."""

        def create(_client: Any) -> str:
            from mlflow import MlflowClient

            if self.uri.startswith("sqlite:///"):
                Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self._client = client = MlflowClient(self.uri)
            run_tags = {STAGE_TAG: self.stage, **(tags or {})}
            commit = git_commit()
            if commit is not None:
                run_tags["mlflow.source.git.commit"] = commit[0]
            experiment = experiment_id(client, self.experiment, self._artifact_location)
            run = client.create_run(experiment, run_name=run_name, tags=run_tags)
            log_params(client, run.info.run_id, params)
            return run.info.run_id

        self.run_id = self.call("create the run", create)
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        self.call("log metrics", lambda client: log_metrics(client, self.run_id, metrics, step))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        self.call("set tags", lambda client: client.log_batch(self.run_id, tags=items, synchronous=True))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.call(f"upload {path}", lambda client: client.log_artifacts(self.run_id, str(path), artifact_path))
        else:
            self.call(f"upload {path}", lambda client: client.log_artifact(self.run_id, str(path), artifact_path))

    def log_datasets(self, datasets: Sequence[tuple[ShardDataset, str, Mapping[str, str]]]) -> None:
        self.call("log the datasets", lambda client: client.log_inputs(self.run_id, datasets=_dataset_inputs(datasets)))

    def log_model(
        self, release_dir: str | Path, register_as: str = "", tags: Mapping[str, str] | None = None
    ) -> str | None:
        """Log the release folder as the run's MLflow model; with `register_as`, register it as a new
        version of that name. Returns the version, or None."""
        import tempfile

        if not self.enabled or self.run_id is None:
            return None
        with tempfile.TemporaryDirectory(prefix="m2dist-mlflow-model-") as tmp:
            model_dir = save_mlflow_model(release_dir, Path(tmp) / MODEL_ARTIFACT_PATH)
            self.log_artifact(model_dir, MODEL_ARTIFACT_PATH)
        if not register_as:
            return None
        version = self.call(
            f"register {register_as}",
            lambda client: register_model_version(client, register_as, self.run_id, tags or {}),
        )
        if version is not None:
            self.registered = f"{MODEL_URI_PREFIX}{register_as}/{version}"
        return version

    def end(self, failed: bool = False) -> None:
        status = "FAILED" if failed else "FINISHED"
        self.call("end the run", lambda client: client.set_terminated(self.run_id, status))

    def summary(self) -> str:
        """One line for the user: where the run went, that tracking failed, or that it was off."""
        if self.failure:
            return f"MLflow tracking failed ({self.failure}); the {self.stage} output above is complete"
        if self.run_id is None:
            return "MLflow tracking off"
        registered = f"; registered {self.registered}" if self.registered else ""
        return f"MLflow run {self.run_id} ({self.stage}) in experiment {self.experiment!r} at {self.uri}{registered}"

    def __enter__(self) -> StageRun:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.run_id is not None and self.enabled:
            self.end(failed=exc_type is not None)


def tracked_tokenizer_training(
    run: StageRun,
    inputs: Sequence[str | Path],
    model_path: str | Path,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    lowercase: bool = True,
    input_format: str = "auto",
    text_field: str = "text",
    num_threads: int | None = None,
) -> Any:
    """tools/train_tokenizer.py: `train_tokenizer_from_files` in a run with its settings as params,
    documents, characters, seconds and throughput as metrics, the SHA-256 as a tag and the
    .model/.vocab files as artifacts (under tokenizer/). Returns the tokenizer."""
    params = {
        "inputs": json.dumps([str(p) for p in inputs]), "model_path": str(model_path), "vocab_size": vocab_size,
        "model_type": model_type, "character_coverage": character_coverage, "lowercase": lowercase,
        "input_format": input_format, "text_field": text_field, "num_threads": num_threads or os.cpu_count(),
    }  # fmt: skip
    with run:
        name = readable_run_name("tokenizer", Path(model_path).stem, f"{model_type}{human_count(vocab_size)}")
        run.start(name, params)
        stats: dict[str, float] = {}
        tokenizer = train_tokenizer_from_files(
            inputs, model_path, vocab_size, model_type, character_coverage, lowercase, input_format, text_field,  # type: ignore[arg-type]
            num_threads, stats=stats,
        )  # fmt: skip
        seconds = max(stats["seconds"], 1e-9)
        input_bytes = sum(Path(p).stat().st_size for p in inputs)
        run.log_metrics({
            "documents": stats["documents"], "characters": stats["characters"], "input_bytes": input_bytes,
            "seconds": seconds, "characters_per_s": stats["characters"] / seconds, "vocab_size": tokenizer.vocab_size,
        })  # fmt: skip
        run.set_tags({TOKENIZER_SHA_TAG: tokenizer.sha256})
        for path in (tokenizer.path, tokenizer.path.with_suffix(".vocab")):
            if path.is_file():
                run.log_artifact(path, "tokenizer")
    return tokenizer


def tracked_prepare_mds(
    run: StageRun,
    inputs: Sequence[str | Path],
    out: str | Path,
    tokenizer_path: str | Path | None,
    max_len: int,
    mode: str = "pad",
    **options: Any,
) -> Any:
    """tools/prepare_mds.py: `prepare_mds` in a run with its settings as params, each split's counts
    and the throughput as metrics, the manifests as artifacts (manifests/), and each split logged
    as an MLflow dataset (context "prepared-train" / "prepared-validation") named after its folder
    with the manifest's digest. Returns prepare_mds's result."""
    params = {
        "inputs": json.dumps([str(p) for p in inputs]), "out": str(out),
        "tokenizer": str(tokenizer_path or DEFAULT_VOCAB), "max_len": max_len, "mode": mode,
        **{k: v for k, v in options.items() if k != "progress"},
    }  # fmt: skip
    with run:
        run.start(readable_run_name("shards", Path(str(out).rstrip("/")).name, f"L{max_len}", mode), params)
        started = time.perf_counter()
        result = prepare_mds(inputs, out, tokenizer_path, max_len, mode, **options)  # type: ignore[arg-type]
        seconds = max(time.perf_counter() - started, 1e-9)
        metrics: dict[str, float] = {"seconds": seconds}
        datasets = []
        for split, manifest in result.manifests.items():
            metrics.update({f"{split}/{k}": v for k, v in dataclasses.asdict(manifest.counts).items()})
            context = "prepared-" + ("train" if split == "train" else "validation")
            datasets.append((shard_dataset(result.locations[split], manifest), context, {}))
        tokens = sum(m.counts.tokens for m in result.manifests.values())
        metrics["tokens_per_s"] = tokens / seconds
        metrics["documents_per_s"] = sum(m.counts.documents for m in result.manifests.values()) / seconds
        run.log_metrics(metrics)
        first = next(iter(result.manifests.values()))
        dataset_tags = {f"m2dist.dataset.{c.removeprefix('prepared-')}": f"{d.name}@{d.digest}" for d, c, _ in datasets}
        run.set_tags({TOKENIZER_SHA_TAG: first.tokenizer_sha256, **dataset_tags})
        run.log_datasets(datasets)
        for split, manifest in result.manifests.items():
            text = manifest.to_json()
            run.call(
                f"upload the {split} manifest",
                lambda client, t=text, s=split: client.log_text(run.run_id, t, f"manifests/{s}.json"),
            )
    return result


def source_lineage(source: str | Path, tag: str | None = None) -> dict[str, str]:
    """What a conversion's source says of its origin: a training run's MLflow run id and store
    (from its checkpoint), or the lineage file of a model folder; {} when unknown."""
    # Imported here, as in log_final_model: torch.
    from m2dist.checkpoint import zero
    from m2dist.checkpoint.layout import is_training_checkpoint

    source = Path(source)
    try:
        if is_training_checkpoint(source):
            root, tag = zero.resolve_zero_checkpoint(source, tag)
            state = zero.client_state(root, tag)
            run_id = state.get("mlflow_run_id")
            tracking = state.get("config", {}).get("tracking", {})
            uri = tracking.get("tracking_uri", "")
            if not uri and (root.parent / "mlflow.db").is_file():
                uri = f"sqlite:///{(root.parent / 'mlflow.db').resolve()}"
            found = {"training_run_id": run_id, "source_run_id": run_id, "tracking_uri": uri}
            return {k: v for k, v in found.items() if v}
    except Exception as err:  # an unreadable source fails in the conversion itself, with its own message
        logger.debug("no lineage from %s: %s", source, err)
        return {}
    return read_lineage(source) if source.is_dir() else {}


def tracked_convert(
    run: StageRun,
    source: str | Path,
    destination: str | Path,
    to: str,
    *,
    register: str = "",
    tag: str | None = None,
    **options: Any,
) -> Path:
    """tools/convert_checkpoint.py: `convert_checkpoint` in a run linked to its source (tags with
    the training run id and the source's run id, or its path), with the memory figures as metrics
    and the model card and config as artifacts. With `register` (a release only), the result is
    logged as the run's MLflow model and registered as a new version of that name. A release
    written here gets a lineage file. Returns the written path."""
    # Imported here, as in log_final_model: torch.
    from m2dist.checkpoint.convert import convert_checkpoint

    if register and to != "release":
        raise ValueError(f"register={register!r} needs a release (--to release), got --to {to}")
    if "/" in register or ":" in register:
        raise ValueError(f'register: expected a model name without "/" or ":", got {register!r}')
    lineage = source_lineage(source, tag)
    params = {"source": str(Path(source).resolve()), "destination": str(Path(destination).resolve()), "to": to,
              "tag": tag or "", "register": register, **options}  # fmt: skip
    source_model = f"{lineage['registered_model']}/{lineage['model_version']}" if "model_version" in lineage else None
    tags = {SOURCE_PATH_TAG: str(Path(source).resolve()), TRAINING_RUN_TAG: lineage.get("training_run_id"),
            SOURCE_RUN_TAG: lineage.get("source_run_id"), SOURCE_MODEL_TAG: source_model}  # fmt: skip
    source_name = Path(source).resolve().name
    with run:
        run.start(readable_run_name("convert", source_name, f"to-{to}"), params, {k: v for k, v in tags.items() if v})
        stats: dict[str, float] = options.pop("stats", None)
        stats = {} if stats is None else stats
        started = time.perf_counter()
        written = convert_checkpoint(source, destination, to, tag=tag, stats=stats, **options)
        run.log_metrics({**stats, "seconds": time.perf_counter() - started})
        for name in ("config.json", "model_card.md"):
            if written.is_dir() and (written / name).is_file():
                run.log_artifact(written / name)
        version = None
        if register:
            version_tags = {
                TRAINING_RUN_TAG: lineage.get("training_run_id", ""), SOURCE_PATH_TAG: str(Path(source).resolve())
            }
            version = run.log_model(written, register, {k: v for k, v in version_tags.items() if v})
        if to == "release":
            write_lineage(
                written, tracking_uri=run.uri if run.run_id else None, training_run_id=lineage.get("training_run_id"),
                source_run_id=run.run_id, registered_model=register if version else None, model_version=version,
            )  # fmt: skip
    return written
