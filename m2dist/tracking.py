"""MLflow experiment tracking for rank 0, behind one small sink interface.

`build_tracker` returns an `MlflowTracker` on rank 0 and a `NullTracker` on the other ranks or when
tracking is off. The training thread never waits on the network: `log_*` calls only append to
buffers, and one background thread creates (or reopens) the run and sends params, metrics in
batches (`MlflowClient.log_batch`, up to 1000 points a call) and artifacts. When the tracking server
is unreachable or fails, that thread warns once, keeps the metrics (beyond `max_buffered_metrics`
the oldest are dropped and counted), retries every `retry_every_seconds` and sends the backlog when
the server answers again. Nothing is raised into training for tracking.

A resumed job passes the run id stored in its checkpoint to `start` and continues the same run.
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

from m2dist.config import TrackingConfig

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

    def flush(self, timeout: float = 30.0) -> bool:
        return True

    def close(self, status: RunStatus = "FINISHED") -> None:
        if status not in RUN_STATUSES:
            raise ValueError(f"close: expected status in {RUN_STATUSES}, got {status!r}")


@lru_cache(maxsize=1024)
def _mlflow_key(key: str) -> str:
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
        params = {_mlflow_key(key): str(value)[:MAX_PARAM_VALUE_LENGTH] for key, value in params.items()}
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
                    points.append((_mlflow_key(key), float(value), timestamp, int(step)))
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

    def flush(self, timeout: float = 30.0) -> bool:
        if self._thread is None or not self._thread.is_alive():
            return not self._has_work()
        deadline = time.monotonic() + timeout
        self._next_attempt = 0.0
        self._wake.set()
        while self._has_work():
            if time.monotonic() >= deadline:
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
        from mlflow.exceptions import MlflowException

        name = self._config.experiment
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage != "active":
                client.restore_experiment(experiment.experiment_id)
            return experiment.experiment_id
        try:
            return client.create_experiment(name, artifact_location=self._artifact_location)
        except MlflowException as err:
            # Another job created it in between.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise err
            return experiment.experiment_id

    def _log_params(self, client: Any, params: dict[str, str]) -> None:
        """Log params the run does not have yet; on a resumed run, changed values become tags
        `resumed.<key>` (MLflow params cannot change)."""
        from mlflow.entities import Param, RunTag

        existing = client.get_run(self._run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        changed = [RunTag(f"resumed.{k}"[:MAX_KEY_LENGTH], v) for k, v in params.items() if existing.get(k, v) != v]
        for start in range(0, len(new), _PARAMS_PER_BATCH):
            client.log_batch(self._run_id, params=new[start : start + _PARAMS_PER_BATCH], synchronous=True)
        for start in range(0, len(changed), _PARAMS_PER_BATCH):
            client.log_batch(self._run_id, tags=changed[start : start + _PARAMS_PER_BATCH], synchronous=True)
        if "runtime.git_commit" in params:
            client.set_tag(self._run_id, "mlflow.source.git.commit", params["runtime.git_commit"])


def build_tracker(tracking_config: TrackingConfig, rank: int, output_dir: str | Path) -> Tracker:
    """An `MlflowTracker` on rank 0 when tracking is enabled, else a `NullTracker`."""
    if not tracking_config.enabled or rank != 0:
        return NullTracker()
    uri, artifact_location = resolve_tracking_uri(tracking_config, output_dir)
    return MlflowTracker(tracking_config, uri, artifact_location)
