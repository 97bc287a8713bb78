"""MLflow for a GLUE evaluation: one parent run, a nested run per job, from the calling process.

m2dist.tracking's `Tracker` logs one run per training job and cannot nest runs, so this uses
`MlflowClient` directly: a nested run is a run tagged `mlflow.parentRunId`. The store is
resolved as for training (`tracking.tracking_uri`, else $MLFLOW_TRACKING_URI, else
`sqlite:///<output_dir>/mlflow.db`). Worker processes never log; the scheduler's events arrive
here. A tracking failure warns once and turns tracking off; the evaluation goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from m2dist.config import TrackingConfig
from m2dist.tracking import MAX_PARAM_VALUE_LENGTH, _mlflow_key, resolve_tracking_uri

logger = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"


class GlueTracking:
    """Parent and nested MLflow runs; every method is a no-op when tracking is off or failed."""

    def __init__(self, config: TrackingConfig, output_dir: str | Path) -> None:
        self.enabled = config.enabled
        self.experiment = config.experiment
        self.uri, self._artifact_location = resolve_tracking_uri(config, output_dir)
        self._client: Any = None
        self.parent_run_id: str | None = None
        self._job_runs: dict[str, str] = {}
        self._experiment_id = ""

    def _call(self, what: str, fn) -> Any:
        if not self.enabled:
            return None
        try:
            return fn()
        except Exception as err:  # tracking never stops the evaluation
            logger.warning(
                "MLflow tracking off for this evaluation: could not %s in %s (%s: %s)", what, self.uri, type(err).__name__, err
            )
            self.enabled = False
            return None

    def start(self, run_name: str, params: Mapping[str, str]) -> str | None:
        def start() -> str:
            from mlflow import MlflowClient

            if self.uri.startswith("sqlite:///"):
                Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(self.uri)
            experiment = self._client.get_experiment_by_name(self.experiment)
            if experiment is None:
                self._experiment_id = self._client.create_experiment(
                    self.experiment, artifact_location=self._artifact_location
                )
            else:
                self._experiment_id = experiment.experiment_id
            run = self._client.create_run(self._experiment_id, run_name=run_name)
            self.parent_run_id = run.info.run_id
            self._log_params(self.parent_run_id, params)
            return self.parent_run_id

        return self._call("create the parent run", start)

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(_mlflow_key(k), str(v)[:MAX_PARAM_VALUE_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._client.log_batch(run_id, params=items[start : start + 100], synchronous=True)

    def _log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_mlflow_key(k), float(v), now, step) for k, v in metrics.items()]
        self._client.log_batch(run_id, metrics=items, synchronous=True)

    def start_job(self, job_id: str, params: Mapping[str, str]) -> None:
        def start() -> None:
            run = self._client.create_run(self._experiment_id, run_name=job_id, tags={PARENT_TAG: self.parent_run_id})
            self._job_runs[job_id] = run.info.run_id
            self._log_params(run.info.run_id, params)

        self._call(f"create the run of {job_id}", start)

    def log_job_metrics(self, job_id: str, metrics: Mapping[str, float], step: int) -> None:
        if job_id in self._job_runs:
            self._call(f"log metrics of {job_id}", lambda: self._log_metrics(self._job_runs[job_id], metrics, step))

    def end_job(self, job_id: str, final: Mapping[str, float] | None, error: str = "") -> None:
        run_id = self._job_runs.pop(job_id, None)
        if run_id is None:
            return

        def end() -> None:
            if final:
                self._log_metrics(run_id, final, 0)
            if error:
                self._client.set_tag(run_id, "error", error[-4000:])
            self._client.set_terminated(run_id, "FAILED" if error else "FINISHED")

        self._call(f"end the run of {job_id}", end)

    def finish(self, metrics: Mapping[str, float], artifacts: list[Path], failed: bool) -> None:
        if self.parent_run_id is None:
            return

        def finish() -> None:
            if metrics:
                self._log_metrics(self.parent_run_id, metrics, 0)
            for path in artifacts:
                self._client.log_artifact(self.parent_run_id, str(path))
            self._client.set_terminated(self.parent_run_id, "FAILED" if failed else "FINISHED")

        self._call("end the parent run", finish)

    def abort(self) -> None:
        """End every open run as KILLED (an interrupted evaluation)."""
        for run_id in [*self._job_runs.values(), self.parent_run_id]:
            if run_id is not None:
                self._call("end a run", lambda run_id=run_id: self._client.set_terminated(run_id, "KILLED"))
