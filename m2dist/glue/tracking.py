"""MLflow for a GLUE evaluation: one parent run, a nested run per job, from the calling process.

m2dist.tracking's `Tracker` logs one run per training job and cannot nest runs, so this uses
`MlflowClient` directly: a nested run is a run tagged `mlflow.parentRunId`. The store is
resolved as for training (`tracking.tracking_uri`, else $MLFLOW_TRACKING_URI, else
`sqlite:///<output_dir>/mlflow.db`). Worker processes never log; the scheduler's events arrive
here. A tracking failure warns once and turns tracking off; the evaluation goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from m2dist.config import TrackingConfig
from m2dist.errors import CheckpointError
from m2dist.tracking import (
    MODEL_URI_PREFIX,
    SOURCE_MODEL_NAME_TAG,
    SOURCE_MODEL_TAG,
    SOURCE_MODEL_VERSION_TAG,
    SOURCE_PATH_TAG,
    SOURCE_RUN_TAG,
    STAGE_TAG,
    TRAINING_RUN_TAG,
    experiment_id,
    log_metrics,
    log_params,
    read_lineage,
    readable_run_name,
    release_in_mlflow_model,
    resolve_tracking_uri,
    write_lineage,
)

logger = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
# Model version tags written by a finished evaluation: its parent run and the scores.
VERSION_RUN_TAG = "glue.run_id"


def parse_model_uri(checkpoint: str | Path) -> tuple[str, str] | None:
    """("name", "3") for "models:/name/3", ("name", "@alias") for "models:/name@alias", None for a path."""
    text = str(checkpoint)
    if not text.startswith(MODEL_URI_PREFIX):
        return None
    rest = text.removeprefix(MODEL_URI_PREFIX).strip("/")
    if "@" in rest and "/" not in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return name, "@" + alias
    name, _, version = rest.partition("/")
    if not name or not version.isdigit():
        raise CheckpointError(f"{text}: expected models:/<name>/<version> or models:/<name>@<alias>")
    return name, version


def model_label(checkpoint: str | Path) -> str:
    """A name for outputs: "m2-debug-v3" for models:/m2-debug/3, the path itself otherwise."""
    parsed = parse_model_uri(checkpoint)
    if parsed is None:
        return str(checkpoint)
    name, version = parsed
    return f"{name}-{version.lstrip('@')}" if version.startswith("@") else f"{name}-v{version}"


def local_checkpoint(checkpoint: str | Path, config: TrackingConfig, output_dir: str | Path) -> Path:
    """`checkpoint` itself for a path; for a registered model (models:/<name>/<version>), its release
    folder downloaded from the registry of the evaluation's store (tracking.tracking_uri, else
    $MLFLOW_TRACKING_URI, else the SQLite store in `output_dir`) into
    `<output_dir>/source_model/<name>-v<version>`, with a lineage file naming the version and its runs."""
    parsed = parse_model_uri(checkpoint)
    if parsed is None:
        return Path(checkpoint)
    import shutil
    import tempfile

    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    name, version = parsed
    uri = resolve_tracking_uri(config, output_dir)[0]
    client = MlflowClient(uri, registry_uri=uri)
    try:
        if version.startswith("@"):
            found = client.get_model_version_by_alias(name, version[1:])
        else:
            found = client.get_model_version(name, version)
    except Exception as err:
        reason = f"{type(err).__name__}: {err}"
        raise CheckpointError(f"{checkpoint}: not found in the model registry at {uri} ({reason})") from None
    destination = Path(output_dir) / "source_model" / model_label(f"{MODEL_URI_PREFIX}{name}/{found.version}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=destination.parent) as staging:
        # The version's own source, read through this client: a models:/ URI would be resolved
        # against the default registry, not `uri`.
        if found.source.startswith(f"runs:/{found.run_id}/"):
            path = found.source.removeprefix(f"runs:/{found.run_id}/")
            local = client.download_artifacts(found.run_id, path, staging)
        else:
            source = client.get_model_version_download_uri(name, found.version)
            local = download_artifacts(artifact_uri=source, dst_path=staging, tracking_uri=uri)
        release = release_in_mlflow_model(local)
        shutil.rmtree(destination, ignore_errors=True)
        shutil.move(str(release), destination)
    write_lineage(
        destination, tracking_uri=uri, registered_model=name, model_version=str(found.version),
        source_run_id=found.run_id, training_run_id=found.tags.get(TRAINING_RUN_TAG) or found.run_id,
    )  # fmt: skip
    logger.info("%s: version %s of %s downloaded to %s", checkpoint, found.version, name, destination)
    return destination


def lineage_tags(source: str | Path | None) -> dict[str, str]:
    """Run tags linking an evaluation to its checkpoint: the model version and the runs it comes from."""
    if source is None:
        return {}
    lineage = read_lineage(source) if Path(source).is_dir() else {}
    tags = {
        SOURCE_PATH_TAG: str(Path(source).resolve()),
        TRAINING_RUN_TAG: lineage.get("training_run_id", ""),
        SOURCE_RUN_TAG: lineage.get("source_run_id", ""),
    }
    if lineage.get("registered_model") and lineage.get("model_version"):
        tags[SOURCE_MODEL_NAME_TAG] = lineage["registered_model"]
        tags[SOURCE_MODEL_VERSION_TAG] = lineage["model_version"]
        tags[SOURCE_MODEL_TAG] = f"{lineage['registered_model']}/{lineage['model_version']}"
    return {k: v for k, v in tags.items() if v}


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
        self._lineage: dict[str, str] = {}
        self._source_tags: dict[str, str] = {}

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

    def start(self, run_name: str, params: Mapping[str, str], source: str | Path | None = None) -> str | None:
        """Create the parent run, named `run_name` and the date, tagged with the lineage of `source`
        (the checkpoint evaluated); its job runs get the same tags."""
        self._source_tags = {STAGE_TAG: "glue", **lineage_tags(source)}
        self._lineage = read_lineage(source) if source is not None and Path(source).is_dir() else {}

        def start() -> str:
            from mlflow import MlflowClient

            if self.uri.startswith("sqlite:///"):
                Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(self.uri)
            self._experiment_id = experiment_id(self._client, self.experiment, self._artifact_location)
            name = readable_run_name(run_name)
            run = self._client.create_run(self._experiment_id, run_name=name, tags=self._source_tags)
            self.parent_run_id = run.info.run_id
            log_params(self._client, self.parent_run_id, params)
            return self.parent_run_id

        return self._call("create the parent run", start)

    def start_job(self, job_id: str, params: Mapping[str, str]) -> None:
        def start() -> None:
            tags = {**self._source_tags, PARENT_TAG: self.parent_run_id}
            run = self._client.create_run(self._experiment_id, run_name=job_id, tags=tags)
            self._job_runs[job_id] = run.info.run_id
            log_params(self._client, run.info.run_id, params)

        self._call(f"create the run of {job_id}", start)

    def log_job_metrics(self, job_id: str, metrics: Mapping[str, float], step: int) -> None:
        if job_id in self._job_runs:
            self._call(f"log metrics of {job_id}", lambda: log_metrics(self._client, self._job_runs[job_id], metrics, step))

    def end_job(self, job_id: str, final: Mapping[str, float] | None, error: str = "") -> None:
        run_id = self._job_runs.pop(job_id, None)
        if run_id is None:
            return

        def end() -> None:
            if final:
                log_metrics(self._client, run_id, final, 0)
            if error:
                self._client.set_tag(run_id, "error", error[-4000:])
            self._client.set_terminated(run_id, "FAILED" if error else "FINISHED")

        self._call(f"end the run of {job_id}", end)

    def finish(self, metrics: Mapping[str, float], artifacts: list[Path], failed: bool) -> None:
        if self.parent_run_id is None:
            return

        def finish() -> None:
            if metrics:
                log_metrics(self._client, self.parent_run_id, metrics, 0)
            for path in artifacts:
                self._client.log_artifact(self.parent_run_id, str(path))
            self._client.set_terminated(self.parent_run_id, "FAILED" if failed else "FINISHED")

        self._call("end the parent run", finish)
        self._tag_model_version(metrics)

    def _tag_model_version(self, metrics: Mapping[str, float]) -> None:
        """Write the scores and the parent run id on the evaluated model version, so that its page in
        the registry shows them (when the version is in this evaluation's store)."""
        name, version = self._lineage.get("registered_model"), self._lineage.get("model_version")
        if not (name and version and self.parent_run_id):
            return
        if self._lineage.get("tracking_uri") != self.uri:
            logger.info("GLUE scores not written on %s/%s: its registry is not %s", name, version, self.uri)
            return

        def tag() -> None:
            self._client.set_model_version_tag(name, version, VERSION_RUN_TAG, self.parent_run_id)
            for key, value in metrics.items():
                label = "glue.score" if key == "glue" else f"glue.{key.removesuffix('/mean')}"
                self._client.set_model_version_tag(name, version, label, f"{value:.4f}")

        self._call(f"tag the model version {name}/{version}", tag)

    def abort(self) -> None:
        """End every open run as KILLED (an interrupted evaluation)."""
        for run_id in [*self._job_runs.values(), self.parent_run_id]:
            if run_id is not None:
                self._call("end a run", lambda run_id=run_id: self._client.set_terminated(run_id, "KILLED"))
