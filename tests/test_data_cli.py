"""The command lines of the data tools, run as a user runs them (one subprocess each)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, store: Path) -> subprocess.CompletedProcess:
    """The tool from the repository root, tracking into a SQLite store at `store`."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{store}")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_prepare_mds_command_line(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "The first document."}\n{"text": "A second, longer document of a few words."}\n')
    out = tmp_path / "shards"
    done = run(
        "tools/prepare_mds.py", "--out", str(out), "--max-len", "16", "--quiet", "--val-fraction", "0", str(docs),
        store=tmp_path / "mlflow.db",
    )
    assert done.returncode == 0, done.stderr
    assert f"{out}/train: 2 samples" in done.stdout
    assert (out / "train" / "m2dist_manifest.json").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    failed = run(
        "tools/prepare_mds.py", "--out", str(tmp_path / "x"), "--max-len", "16", "--quiet", str(bad),
        store=tmp_path / "mlflow.db",
    )
    assert failed.returncode != 0 and f"error: {bad}:2: not valid JSON" in failed.stderr
    # Both runs are in the store: the failed preparation marked so.
    from mlflow import MlflowClient

    assert "MLflow run" in done.stdout and "(shards) in experiment 'm2dist'" in done.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("m2dist").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    # Artifacts beside the database, not in the working directory.
    assert list((tmp_path / "mlruns").glob("*/artifacts/manifests/train.json"))
