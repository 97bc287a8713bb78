"""MLflow tracking: the local SQLite default, a real `mlflow server` on loopback, a server killed
mid-run and restarted, and a server that is not there at all."""

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from m2dist.config import Config, TrackingConfig, config_from_dict
from m2dist.errors import ConfigError
from m2dist.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    MlflowTracker,
    NullTracker,
    build_tracker,
    collect_run_params,
    flatten_params,
    plot_loss_curve,
)

SERVER_START_DEADLINE_S = 90.0


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """A TMPDIR of the test's own, no inherited tracking URI and short HTTP timeouts."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """`mlflow server` on 127.0.0.1 in its own process group, with its SQLite store under `root`."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.uri = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, env=env, start_new_session=True
            )
        deadline = time.monotonic() + SERVER_START_DEADLINE_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"mlflow server not ready after {SERVER_START_DEADLINE_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGKILL the whole process group (the CLI and its uvicorn worker)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self.process = None

    def log_tail(self) -> str:
        return (self.root / "server.log").read_text(errors="replace")[-3000:]


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "server", free_loopback_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()


def tracking_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "m2dist.tracking" and r.levelno == logging.WARNING]


def loss_history(client: MlflowClient, run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, "train/loss")}


def test_flatten_params_and_run_params():
    flat = flatten_params({"model": {"hidden_size": 768, "kernels": {"fftconv": "reference"}}, "betas": (0.9, 0.98),
                           "empty": {}, "long": "x" * 2000, "flag": True})  # fmt: skip
    assert flat == {
        "model.hidden_size": "768",
        "model.kernels.fftconv": "reference",
        "betas": "[0.9, 0.98]",
        "empty": "{}",
        "long": "x" * (MAX_PARAM_VALUE_LENGTH - 3) + "...",
        "flag": "True",
    }
    params = collect_run_params(Config(), world_size=2)
    assert params["model.hidden_size"] == "768" and params["tracking.experiment"] == "m2dist"
    assert params["runtime.world_size"] == "2"
    for package in ("torch", "deepspeed", "triton", "mosaicml-streaming", "mlflow"):
        assert params[f"runtime.version.{package}"]
    assert all(len(v) <= MAX_PARAM_VALUE_LENGTH for v in params.values())
    with pytest.raises(ValueError, match="mapping"):
        flatten_params([1, 2])


def test_tracking_config_checks():
    tracking = config_from_dict({"tracking": {"experiment": "sweep", "flush_every_seconds": 2}}).tracking
    assert tracking.experiment == "sweep" and tracking.flush_every_seconds == 2.0
    with pytest.raises(ConfigError, match="tracking.experiment"):
        config_from_dict({"tracking": {"experiment": " "}})
    with pytest.raises(ConfigError, match="tracking.tracking_uri"):
        TrackingConfig(tracking_uri="file:///tmp/mlruns")
    with pytest.raises(ConfigError, match="tracking.max_buffered_metrics"):
        TrackingConfig(flush_every_entries=100, max_buffered_metrics=10)
    with pytest.raises(ConfigError, match="tracking.retry_every_seconds"):
        TrackingConfig(retry_every_seconds=0)


def test_null_tracker_for_other_ranks_and_disabled(tmp_path):
    other_rank = build_tracker(TrackingConfig(), 1, tmp_path)
    for tracker in (other_rank, build_tracker(TrackingConfig(enabled=False), 0, tmp_path)):
        assert isinstance(tracker, NullTracker)
        assert tracker.start("run", {"a": "1"}, resume_run_id="abc") == "abc"
        tracker.log_metrics({"loss": 1.0}, 1)
        tracker.log_text("x", "x.txt")
        assert tracker.flush(0)
        tracker.close()
    assert list(tmp_path.iterdir()) == [tmp_path / "tmp"]


def test_plot_loss_curve(tmp_path):
    path = plot_loss_curve(range(1, 51), [10 / s for s in range(1, 51)], tmp_path / "plots" / "loss.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="as many steps as losses"):
        plot_loss_curve([1, 2], [1.0], tmp_path / "bad.png")


def test_local_sqlite_store_by_default(tmp_path):
    out = tmp_path / "out"
    config = TrackingConfig(flush_every_seconds=0.2)
    tracker = build_tracker(config, 0, out)
    run_id = tracker.start("local", {"model.hidden_size": "768", "runtime.world_size": "1"})
    assert run_id
    for step in range(1, 6):
        tracker.log_metrics({"train/loss": 10.0 / step, "train/tokens/s": 100.0 * step, "bad key!": 1.0}, step)
    tracker.log_dict({"model": {"hidden_size": 768}}, "config.yaml")
    tracker.log_artifact(plot_loss_curve([1, 2, 3], [3.0, 2.0, 1.0], out / "loss.png"))
    tracker.close()

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"model.hidden_size": "768", "runtime.world_size": "1"}
    assert loss_history(client, run_id) == {step: 10.0 / step for step in range(1, 6)}
    assert run.data.metrics["train/tokens/s"] == 500.0 and run.data.metrics["bad key_"] == 1.0
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["config.yaml", "loss.png"]
    assert (out / "mlruns" / run_id / "artifacts" / "loss.png").is_file()
    assert "hidden_size: 768" in (out / "mlruns" / run_id / "artifacts" / "config.yaml").read_text()

    resumed = build_tracker(config, 0, out)
    params = {"model.hidden_size": "768", "runtime.world_size": "2"}
    assert resumed.start("local", params, resume_run_id=run_id) == run_id
    resumed.log_metrics({"train/loss": 1.0}, 6)
    resumed.close()
    run = client.get_run(run_id)
    assert run.data.params["runtime.world_size"] == "1" and run.data.tags["resumed.runtime.world_size"] == "2"
    assert sorted(loss_history(client, run_id)) == [1, 2, 3, 4, 5, 6]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_server_receives_one_run_and_resume_appends(mlflow_server, tmp_path):
    config = TrackingConfig(tracking_uri=mlflow_server.uri, experiment="engine-test", flush_every_seconds=0.2)
    params = collect_run_params(Config(), world_size=2)
    other_rank = build_tracker(config, 1, tmp_path / "out")
    tracker = build_tracker(config, 0, tmp_path / "out")
    assert isinstance(tracker, MlflowTracker)
    run_id = tracker.start("server", params)
    other_rank.start("server", params)
    assert run_id
    for step in range(1, 21):
        tracker.log_metrics({"train/loss": 10.0 / step, "train/lr": 1e-4 * step}, step)
        other_rank.log_metrics({"train/loss": -1.0}, step)
    tracker.log_dict(Config().to_dict(), "config.yaml")
    tracker.log_dict({"zero_optimization": {"stage": 2}}, "deepspeed.json")
    tracker.log_artifact(plot_loss_curve(range(1, 21), [10.0 / s for s in range(1, 21)], tmp_path / "out" / "loss.png"))
    tracker.close()
    other_rank.close()

    resumed = build_tracker(config, 0, tmp_path / "out")
    assert resumed.start("server", params, resume_run_id=run_id) == run_id
    for step in range(21, 31):
        resumed.log_metrics({"train/loss": 10.0 / step}, step)
    resumed.close()

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("engine-test")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "server"
    assert run.data.params == params
    assert loss_history(client, run_id) == {step: 10.0 / step for step in range(1, 31)}
    assert len(client.get_metric_history(run_id, "train/lr")) == 20
    assert sorted(a.path for a in client.list_artifacts(run_id)) == ["config.yaml", "deepspeed.json", "loss.png"]
    png = client.download_artifacts(run_id, "loss.png", str(tmp_path))
    assert Path(png).read_bytes()[:4] == b"\x89PNG"


def test_server_killed_mid_run_then_back(mlflow_server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="m2dist.tracking")
    config = TrackingConfig(
        tracking_uri=mlflow_server.uri, flush_every_seconds=0.2, flush_every_entries=50, retry_every_seconds=0.5
    )
    tracker = build_tracker(config, 0, tmp_path / "out")
    run_id = tracker.start("outage", {"a": "1"})
    for step in range(1, 6):
        tracker.log_metrics({"train/loss": float(step)}, step)
    assert tracker.flush(timeout=30)

    mlflow_server.stop()
    durations = []
    for step in range(6, 206):
        begin = time.perf_counter()
        tracker.log_metrics({"train/loss": float(step), "train/lr": 0.1, "train/grad_norm": 1.0}, step)
        durations.append(time.perf_counter() - begin)
    tracker.log_text("written during the outage", "outage.txt")
    assert not tracker.flush(timeout=3)
    # Training never waits for the dead server: 200 steps of logging in well under a second each.
    assert sum(durations) < 2.0 and max(durations) < 0.5
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 1 and "failed" in warnings[0], warnings
    assert tracker.pending_metrics == 600

    mlflow_server.start()
    assert tracker.flush(timeout=60)
    tracker.close()
    assert len(tracking_warnings(caplog)) == 1
    assert any("answers again" in r.getMessage() for r in caplog.records if r.name == "m2dist.tracking")

    client = MlflowClient(mlflow_server.uri)
    assert loss_history(client, run_id) == {step: float(step) for step in range(1, 206)}
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run_id)] == ["outage.txt"]


def test_unreachable_server_at_start(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="m2dist.tracking")
    uri = f"http://127.0.0.1:{free_loopback_port()}"
    config = TrackingConfig(
        tracking_uri=uri, flush_every_entries=10, max_buffered_metrics=50, retry_every_seconds=0.5,
        close_timeout_seconds=1.0,
    )  # fmt: skip
    tracker = build_tracker(config, 0, tmp_path / "out")
    begin = time.monotonic()
    assert tracker.start("nowhere", {"a": "1"}) is None
    for step in range(100):
        tracker.log_metrics({"train/loss": 1.0}, step)
    tracker.log_artifact(plot_loss_curve([1], [1.0], tmp_path / "loss.png"))
    tracker.close("FAILED")
    assert time.monotonic() - begin < 15
    assert tracker.dropped_metrics == 50 and tracker.pending_metrics == 50
    warnings = tracking_warnings(caplog)
    assert uri in warnings[0] and "failed" in warnings[0]
    assert sum("failed" in w for w in warnings) == 1
    assert any("dropped" in w for w in warnings) and any("not sent" in w for w in warnings)

    # A resumed job keeps the run id of its checkpoint even when the server is away.
    resumed = build_tracker(config, 0, tmp_path / "out")
    assert resumed.start("nowhere", {"a": "1"}, resume_run_id="0123abcd") == "0123abcd"
    resumed.close()
    assert not (tmp_path / "out").exists()
