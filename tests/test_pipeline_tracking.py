"""MLflow lineage over the whole pipeline against a real `mlflow server` on loopback: tokenizer ->
shards -> 20 training steps -> conversion -> GLUE on tiny fixtures, each stage's run linked to the
one before, the final model in the Model Registry; then every tool with no server to talk to."""

import gzip
import importlib.util
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from m2dist.checkpoint.convert import load_any
from m2dist.data.manifest import read_manifest
from m2dist.data.tokenizer import file_sha256
from m2dist.errors import CheckpointError
from m2dist.glue.runner import evaluate_glue
from m2dist.glue.tracking import model_label, parse_model_uri
from m2dist.tracking import (
    LINEAGE_FILE,
    SOURCE_MODEL_TAG,
    SOURCE_MODEL_VERSION_TAG,
    STAGE_TAG,
    TOKENIZER_SHA_TAG,
    TRAINING_RUN_TAG,
    human_count,
    manifest_digest,
    readable_run_name,
)
from tests.conftest import REPO_ROOT
from tests.test_engine import launch
from tests.test_glue import write_glue_fixture
from tests.test_tracking import free_loopback_port, isolated_env, mlflow_server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow

EMBEDDED_TEXT = REPO_ROOT / "m2dist" / "data" / "assets" / "python-docs-3.11.txt.gz"
VOCAB = 1000
# The debug model shrunk to the tokenizer's padded vocabulary and L=64; 20 steps of 8 sequences.
TRAIN_ARGS = ["model.vocab_size=1024", "train.seq_len=64", "train.global_batch_size=8", "train.duration=20",
              "train.log_every=5", "train.eval_every=0", "train.eval_batches=2", "train.checkpoint_every=0",
              "train.precision=fp32", "data.num_workers=0", "tracking.flush_every_seconds=0.5",
              "tracking.close_timeout_seconds=10"]  # fmt: skip
GLUE_FAST = ["seq_len=32", "eval_batch_size=16", "tasks.sst2.epochs=1", "tasks.sst2.seeds=[19]"]


def tool(name: str):
    """tools/<name>.py as a module, to call its main(argv) as the command line does."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~1500 lines of real English prose."""
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    with gzip.open(EMBEDDED_TEXT, "rt") as source:
        lines = [line for line in source.read().splitlines() if len(line.split()) > 8][:1500]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_tokenizer_and_shards(tmp_path: Path, corpus: Path, uri: str) -> tuple[Path, Path]:
    """tools/train_tokenizer.py then tools/prepare_mds.py; returns (tokenizer file, shard folder)."""
    tokenizer = tmp_path / "tok" / "docs.model"
    shards = tmp_path / "shards" / "docs-64"
    for name, argv in (
        ("train_tokenizer", ["--out", str(tokenizer), "--vocab-size", str(VOCAB), "--threads", "1"]),
        ("prepare_mds", ["--out", str(shards), "--max-len", "64", "--tokenizer", str(tokenizer), "--quiet",
                         "--val-fraction", "0.1"]),
    ):  # fmt: skip
        tool(name).main([*argv, "--tracking-uri", uri, str(corpus)])
    return tokenizer, shards


def train(tmp_path: Path, tokenizer: Path, shards: Path, uri: str, extra: list[str] = ()) -> tuple[Path, str]:
    out = tmp_path / "run"
    args = [*TRAIN_ARGS, f"data.train={shards / 'train'}", f"data.val={shards / 'val'}", f"data.tokenizer={tokenizer}",
            f"train.output_dir={out}", f"tracking.tracking_uri={uri}", *extra]  # fmt: skip
    returncode, output = launch(tmp_path, args, nproc=1, launcher="python", timeout=300)
    assert returncode == 0, output[-5000:]
    return out, output


def runs_by_stage(client: MlflowClient) -> dict[str, list]:
    experiment = client.get_experiment_by_name("m2dist")
    runs: dict[str, list] = {}
    for run in client.search_runs([experiment.experiment_id]):
        runs.setdefault(run.data.tags.get(STAGE_TAG, ""), []).append(run)
    return runs


def test_model_uris_and_run_names():
    assert parse_model_uri("models:/m2-debug/3") == ("m2-debug", "3")
    assert model_label("models:/m2-debug/3") == "m2-debug-v3"
    assert parse_model_uri("models:/m2-debug@champion") == ("m2-debug", "@champion")
    assert parse_model_uri("outputs/debug/release") is None and model_label("out/x") == "out/x"
    for bad in ("models:/m2-debug", "models:/m2-debug/latest", "models:/"):
        with pytest.raises(CheckpointError, match="expected models:/<name>/<version>"):
            parse_model_uri(bad)
    assert [human_count(n) for n in (512, 4_260_416, 110_000_000, 1_300_000_000)] == ["512", "4.26M", "110M", "1.3B"]
    assert re.fullmatch(r"shards-c4-L128-\d{8}-\d{6}", readable_run_name("shards", "c4", "", "L128"))


def test_whole_chain_is_linked_and_the_registered_model_reproduces_the_checkpoint(
    mlflow_server, corpus, tmp_path, monkeypatch, capsys  # noqa: F811
):
    uri = mlflow_server.uri
    tokenizer, shards = make_tokenizer_and_shards(tmp_path, corpus, uri)
    printed = capsys.readouterr().out
    assert printed.count(f"at {uri}") == 2 and "tracking failed" not in printed

    run_dir, output = train(tmp_path, tokenizer, shards, uri)
    assert "tracking failed" not in output and (run_dir / "release" / "model.safetensors").is_file()
    assert f"final model {run_dir / 'release'}, registered as models:/debug/1" in output

    release = tmp_path / "converted"
    tool("convert_checkpoint").main([str(run_dir), str(release), "--to", "release", "--register", "debug",
                                     "--tracking-uri", uri])  # fmt: skip
    assert "registered models:/debug/2" in capsys.readouterr().out

    glue_out = tmp_path / "glue"
    report = evaluate_glue(
        "models:/debug/1", write_glue_fixture(tmp_path / "glue-data"), ["sst2"], output_dir=glue_out, devices="cpu",
        overrides=[*GLUE_FAST, f"tokenizer={tokenizer}", f"tracking.tracking_uri={uri}"], progress=False,
    )  # fmt: skip
    assert not report.failed and report.mlflow_uri == uri

    client = MlflowClient(uri)
    runs = runs_by_stage(client)
    assert {stage: len(found) for stage, found in runs.items()} == {
        "tokenizer": 1, "shards": 1, "pretrain": 1, "convert": 1, "glue": 2,
    }  # fmt: skip
    assert all(run.info.status == "FINISHED" for found in runs.values() for run in found)
    stages = ("tokenizer", "shards", "pretrain", "convert")
    (tokenizer_run,), (shards_run,), (training,), (conversion,) = (runs[s] for s in stages)
    training_id = training.info.run_id
    assert re.fullmatch(r"debug-[\d.]+[kM]-L64-\d{8}-\d{6}", training.info.run_name), training.info.run_name

    # Tokenizer: its files as artifacts, its digest carried by the shards and the training run.
    sha = file_sha256(tokenizer)
    assert tokenizer_run.data.tags[TOKENIZER_SHA_TAG] == shards_run.data.tags[TOKENIZER_SHA_TAG] == sha
    assert training.data.tags[TOKENIZER_SHA_TAG] == sha
    assert tokenizer_run.data.metrics["documents"] == 1500
    assert {a.path for a in client.list_artifacts(tokenizer_run.info.run_id, "tokenizer")} == {
        "tokenizer/docs.model", "tokenizer/docs.vocab",
    }  # fmt: skip

    # Shards: registered as datasets with the manifest's digest; the training run's inputs are them.
    digests = {split: manifest_digest(read_manifest(shards / split)) for split in ("train", "val")}
    prepared = {(d.dataset.name, d.dataset.digest) for d in shards_run.inputs.dataset_inputs}
    assert prepared == {("docs-64/train", digests["train"]), ("docs-64/val", digests["val"])}
    inputs = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): (d.dataset.name, d.dataset.digest)
        for d in training.inputs.dataset_inputs
    }
    assert inputs == {"train": ("docs-64/train", digests["train"]), "validation": ("docs-64/val", digests["val"])}
    assert shards_run.data.metrics["train/samples"] == read_manifest(shards / "train").counts.samples

    # The registered version 1 is the training run's model and gives the logits of its checkpoint.
    version = client.get_model_version("debug", "1")
    assert version.run_id == training_id and version.tags[TRAINING_RUN_TAG] == training_id
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    served = mlflow.pyfunc.load_model("models:/debug/1")
    ids = np.random.default_rng(0).integers(0, 1000, (2, 64))
    checkpoint = load_any(run_dir).eval()
    with torch.no_grad():
        expected = checkpoint(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(served.predict(ids), expected, rtol=0, atol=1e-5)
    # Weights, config and tokenizer as files, nothing pickled.
    downloaded = Path(mlflow.artifacts.download_artifacts("models:/debug/1", dst_path=str(tmp_path / "dl")))
    assert {"model.safetensors", "config.json", "tokenizer.model"} <= {p.name for p in downloaded.rglob("*")}
    assert not [p for p in downloaded.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".bin")]

    # The conversion is linked to the training run and registered as version 2.
    assert conversion.data.tags[TRAINING_RUN_TAG] == training_id
    assert client.get_model_version("debug", "2").run_id == conversion.info.run_id
    assert (release / LINEAGE_FILE).is_file()

    # GLUE: both runs carry the model version and the training run; the version shows the scores.
    for run in runs["glue"]:
        assert run.data.tags[SOURCE_MODEL_TAG] == "debug/1" and run.data.tags[SOURCE_MODEL_VERSION_TAG] == "1"
        assert run.data.tags[TRAINING_RUN_TAG] == training_id
    version = client.get_model_version("debug", "1")
    assert version.tags["glue.run_id"] == report.mlflow_parent_run_id
    assert float(version.tags["glue.sst2"]) == pytest.approx(report.tasks["sst2"].mean, abs=1e-4)


def test_every_tool_finishes_and_says_tracking_failed_without_a_server(corpus, tmp_path, capsys, caplog):
    caplog.set_level(logging.WARNING)
    uri = f"http://127.0.0.1:{free_loopback_port()}"
    tokenizer, shards = make_tokenizer_and_shards(tmp_path, corpus, uri)
    printed = capsys.readouterr().out
    assert printed.count("MLflow tracking failed") == 2, printed
    assert tokenizer.is_file() and (shards / "train" / "m2dist_manifest.json").is_file()

    run_dir, output = train(tmp_path, tokenizer, shards, uri, ["train.duration=5", "tracking.close_timeout_seconds=2"])
    assert "MLflow tracking failed" in output and (run_dir / "checkpoints" / "latest").is_file()

    release = tmp_path / "converted"
    tool("convert_checkpoint").main([str(run_dir), str(release), "--to", "release", "--register", "debug",
                                     "--tracking-uri", uri])  # fmt: skip
    assert "MLflow tracking failed" in capsys.readouterr().out and (release / "model.safetensors").is_file()

    report = evaluate_glue(
        release, write_glue_fixture(tmp_path / "glue-data"), ["sst2"], output_dir=tmp_path / "glue", devices="cpu",
        overrides=[*GLUE_FAST, f"tokenizer={tokenizer}", f"tracking.tracking_uri={uri}"], progress=False,
    )  # fmt: skip
    assert not report.failed and report.tasks["sst2"].mean is not None and report.mlflow_parent_run_id is None
    assert any("MLflow tracking off for this evaluation" in r.getMessage() for r in caplog.records)
