"""tools/compare_runs.py: the table and figure from hand-written metrics of three runs whose figures
are known, the same run read back from MLflow, clear errors, and the reader on a real tiny run."""

import json
from pathlib import Path

import pytest

from m2dist.bench.compare import compare_runs, read_mlflow_run, read_run_folder
from m2dist.config import load_config
from m2dist.engine.metrics import METRICS_FILE, read_metrics
from m2dist.errors import DataError
from tests.test_engine import BASE, _assert_ok, _data_args, launch, tiny_shards  # noqa: F401

# 1,000 tokens a step, a log record every 10 steps and an evaluation every 20.
TOKENS_PER_STEP = 1000


def write_run(
    run_dir: Path, name: str | None, architecture: str, world_size: int, tokens_per_s: float, eval_losses: list[float]
) -> None:
    """A run folder as m2dist/train.py writes it: a log record at steps 10, 20, ..., an evaluation
    line after each record of an even step, and (with a name) config.json."""
    run_dir.mkdir(parents=True)
    lines = []
    for index in range(2 * len(eval_losses)):
        step = 10 * (index + 1)
        lines.append({
            "step": step, "world_size": world_size, "zero_stage": 2, "throughput/tokens_per_s": tokens_per_s,
            "train/loss": 7.0 - index / 10, "train/tokens_seen": float(step * TOKENS_PER_STEP),
        })  # fmt: skip
        if index % 2:
            loss = eval_losses[index // 2]
            lines.append({"step": step, "eval/mlm_loss": loss, "eval/mlm_accuracy": 1 / loss})
    (run_dir / METRICS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    if name is not None:
        overrides = [f"name={name}", f"model.architecture={architecture}", "model.num_attention_heads=2"]
        config = load_config("debug", overrides).to_dict()
        (run_dir / "config.json").write_text(json.dumps(config))


@pytest.fixture
def three_runs(tmp_path) -> list[Path]:
    """Baseline: 2 ranks at 1,000 tokens/s, 20 GPU-s a window, final validation loss 4.0 at 80 GPU-s.
    fast: 1 rank at 2,000 tokens/s (5 GPU-s a window), 3.8 at step 40 = 20 GPU-s: 0.25x.
    slow: never below 5.0."""
    dirs = [tmp_path / "baseline-run", tmp_path / "fast-run", tmp_path / "slow-run"]
    write_run(dirs[0], "bert-base-debug", "bert", 2, 1000.0, [5.0, 4.0])
    write_run(dirs[1], "m2-debug", "m2", 1, 2000.0, [4.5, 3.8])
    write_run(dirs[2], None, "m2", 1, 500.0, [6.0, 5.0])
    return dirs


def table_rows(table: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split(" | ") for line in table.splitlines()[2:]]
    return {cells[0].strip(): [cell.strip() for cell in cells] for cells in rows}


def test_table_and_figure_of_three_runs(tmp_path, three_runs):
    figure = tmp_path / "figures" / "compare.png"
    runs, table = compare_runs(three_runs, figure)
    assert figure.is_file() and figure.read_bytes().startswith(b"\x89PNG") and figure.stat().st_size > 10_000
    assert "GPU-time to val loss 4.0000 (vs bert-base-debug)" in table.splitlines()[0]
    rows = table_rows(table)
    # name | arch | params | steps | tokens | GPU-s | train loss | val loss | val acc | best | tokens/s | reach
    assert rows["bert-base-debug"][1] == "bert" and rows["bert-base-debug"][2] != "-"
    assert rows["bert-base-debug"][3:6] == ["40", "40,000", "80.0"]
    assert rows["bert-base-debug"][6:] == ["6.7000", "4.0000", "0.2500", "4.0000", "1,000", "1.00x (80.0 s)"]
    # The debug model's size, counted from config.json.
    assert rows["m2-debug"][1:6] == ["m2", "4,260,416", "40", "40,000", "20.0"]
    assert rows["m2-debug"][7:] == ["3.8000", "0.2632", "3.8000", "2,000", "0.25x (20.0 s)"]
    # Without config.json: the folder's name, no architecture or size.
    assert rows["slow-run"][1:3] == ["-", "-"] and rows["slow-run"][5] == "80.0"
    assert rows["slow-run"][-1] == "not reached"
    assert [point.gpu_seconds for point in runs[1].evals] == [10.0, 20.0]
    assert [point.tokens_seen for point in runs[1].evals] == [20_000.0, 40_000.0]


def test_a_step_logged_again_after_a_resume_keeps_its_newest_figures(tmp_path, three_runs):
    metrics = three_runs[1] / METRICS_FILE
    lines = metrics.read_text().splitlines()
    # A job killed after step 40 resumes from step 20 and logs 30 and 40 again, faster, ending lower.
    lines += [
        json.dumps({"step": 30, "world_size": 1, "throughput/tokens_per_s": 10_000.0, "train/loss": 6.0,
                    "train/tokens_seen": 30_000.0}),
        json.dumps({"step": 40, "world_size": 1, "throughput/tokens_per_s": 10_000.0, "train/loss": 5.5,
                    "train/tokens_seen": 40_000.0}),
        json.dumps({"step": 40, "eval/mlm_loss": 3.5, "eval/mlm_accuracy": 0.3}),
    ]  # fmt: skip
    metrics.write_text("\n".join(lines) + "\n")
    run = read_run_folder(three_runs[1])
    assert [(p.step, p.loss, p.gpu_seconds) for p in run.evals] == [(20, 4.5, 10.0), (40, 3.5, 12.0)]
    assert run.final_train_loss == 5.5 and run.steps == 40


def test_runs_of_one_config_are_told_apart_by_folder(tmp_path):
    for name in ("lr-1e-3", "lr-2e-3"):
        write_run(tmp_path / name, "debug", "m2", 1, 1000.0, [5.0, 4.0])
    runs, table = compare_runs([tmp_path / "lr-1e-3", tmp_path / "lr-2e-3"], tmp_path / "c.png")
    assert [run.name for run in runs] == ["debug (lr-1e-3)", "debug (lr-2e-3)"]


def test_missing_metrics_and_missing_evaluations_name_the_path(tmp_path, three_runs):
    empty = tmp_path / "empty"
    empty.mkdir()
    expected = rf"{empty / METRICS_FILE}: not found \(folder\); expected the run folder"
    with pytest.raises(FileNotFoundError, match=expected):
        compare_runs([three_runs[0], empty], tmp_path / "c.png")
    no_eval = tmp_path / "no-eval"
    write_run(no_eval, "debug", "m2", 1, 1000.0, [])
    (no_eval / METRICS_FILE).write_text(json.dumps({"step": 10, "train/loss": 7.0, "train/tokens_seen": 1.0}) + "\n")
    with pytest.raises(DataError, match=rf"{no_eval / METRICS_FILE}: no evaluation record \(eval/mlm_loss\)"):
        compare_runs([no_eval], tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_a_run_read_from_mlflow_matches_its_folder(tmp_path, three_runs):
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("m2dist")).info.run_id
    params = {
        "name": "m2-debug", "model.architecture": "m2", "model.num_parameters": "4260416", "runtime.world_size": "1"
    }  # fmt: skip
    metrics = []
    for line in (three_runs[1] / METRICS_FILE).read_text().splitlines():
        record = json.loads(line)
        step = record.pop("step")
        # As the trainer logs them: the scalars, without the record's own fields.
        record.pop("world_size", None)
        record.pop("zero_stage", None)
        metrics += [Metric(key, value, 1000 + step, step) for key, value in record.items()]
        # The train loss of the steps between log steps.
        metrics.append(Metric("train/loss", 9.0, 1000 + step - 1, step - 1))
    client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    from_mlflow, from_folder = read_mlflow_run(uri, run_id), read_run_folder(three_runs[1])
    assert from_mlflow.evals == from_folder.evals
    assert (from_mlflow.name, from_mlflow.num_parameters, from_mlflow.gpu_seconds) == ("m2-debug", 4_260_416, 20.0)
    runs, table = compare_runs([three_runs[0]], tmp_path / "c.png", uri, [run_id])
    assert table_rows(table)["m2-debug"][-1] == "0.25x (20.0 s)"


def train_tiny(tmp_path: Path, shards: Path, name: str, steps: int) -> tuple[Path, str]:
    """A real single-process run of the debug model: 4 samples of 64 tokens a step, an evaluation
    every 2 steps and at the end; about 10 s on a CPU."""
    out = tmp_path / name
    returncode, output = launch(
        tmp_path,
        [*BASE, *_data_args(shards), "train.global_batch_size=4", f"train.duration={steps}", "train.eval_every=2",
         "train.eval_batches=2", "train.checkpoint_every=0", "tracking.enabled=false", "data.num_workers=0",
         f"train.output_dir={out}"],
        nproc=1, launcher="python",
    )  # fmt: skip
    _assert_ok(returncode, output)
    return out, output


@pytest.mark.slow
def test_two_real_tiny_runs(tmp_path, tiny_shards):  # noqa: F811
    long_run, output = train_tiny(tmp_path, tiny_shards, "long", 8)
    short_run, _ = train_tiny(tmp_path, tiny_shards, "short", 2)
    run = read_run_folder(long_run)
    assert (run.name, run.architecture, run.num_parameters, run.steps) == ("debug", "m2", 4_260_416, 8)
    assert [(p.step, p.tokens_seen) for p in run.evals] == [(2, 512.0), (4, 1024.0), (6, 1536.0), (8, 2048.0)]
    assert f"eval at step 8: eval/mlm_loss {run.final_eval.loss:.4f}" in output
    eval_seconds = [r["eval/seconds"] for r in read_metrics(long_run / METRICS_FILE) if "eval/seconds" in r]
    assert len(eval_seconds) == 4 and all(0 < s < 60 for s in eval_seconds), eval_seconds
    assert f"step      8/8  loss {run.final_train_loss:.4f}" in output
    seconds = [p.gpu_seconds for p in run.evals]
    assert 0 < seconds[0] < seconds[1] < seconds[2] < seconds[3] == run.gpu_seconds
    assert run.tokens_per_s > 0 and 0 < run.final_eval.accuracy < 1

    figure = tmp_path / "compare.png"
    runs, table = compare_runs([long_run, short_run], figure)
    assert figure.is_file() and figure.stat().st_size > 10_000
    rows = table_rows(table)
    # Two steps of training stay above the loss that eight reach.
    assert rows["debug (long)"][-1].startswith("1.00x") and rows["debug (short)"][-1] == "not reached"
    assert rows["debug (short)"][3:5] == ["2", "512"]
