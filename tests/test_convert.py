"""tools/convert_checkpoint.py on real training checkpoints: ZeRO-1/2/3 runs of 2 processes on CPU
converted to release folders equal to what the engine held (tests/train_and_dump.py), to the upstream
layout, and to DeepSpeed's universal form, from which a 1-rank run resumes; the 80M model's ZeRO-2
checkpoint consolidated with the weights in memory about once."""

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from m2dist.checkpoint.convert import MODEL_CARD, convert_checkpoint
from m2dist.checkpoint.io import read_safetensors_into, write_safetensors
from m2dist.checkpoint.release import load_release
from m2dist.checkpoint.zero import add_shared_names, empty_model
from m2dist.config import load_config
from m2dist.errors import CheckpointError, OutputExistsError
from m2dist.models import MaskedLM, count_parameters
from tests.conftest import REPO_ROOT
from tests.test_engine import BASE, _assert_ok, _data_args, _env, final_losses, launch, tiny_shards  # noqa: F401 (fixture)
from tests.train_and_dump import probe_input

DUMP_SCRIPT = REPO_ROOT / "tests" / "train_and_dump.py"
STEPS = 6
# The 2-rank runs also checkpoint here, for the resume on one rank.
RESUME_STEP = 3


def test_streaming_safetensors_writer_matches_safetensors(tmp_path):
    tensors = {
        "w": torch.randn(3, 5),
        "b16": torch.randn(7),
        "scalar": torch.tensor(2.5),
        "ids": torch.arange(6).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
    }
    write_safetensors(tmp_path / "a.safetensors", tensors.items())
    back = load_file(str(tmp_path / "a.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    write_safetensors(tmp_path / "b.safetensors", tensors.items(), dtype=torch.bfloat16)
    back = load_file(str(tmp_path / "b.safetensors"))
    assert back["w"].dtype == torch.bfloat16 and torch.equal(back["w"], tensors["w"].bfloat16())
    assert back["ids"].dtype == torch.int64 and back["mask"].dtype == torch.bool


def test_safetensors_reader_fills_targets_casts_and_compares_tied_names(tmp_path):
    shared = torch.randn(4, 3)
    source = {"a": shared, "tied": shared, "ids": torch.arange(5), "half": torch.randn(6).bfloat16()}
    write_safetensors(tmp_path / "w.safetensors", source.items())
    tied = torch.full((4, 3), float("nan"))
    targets = {"a": tied, "tied": tied, "ids": torch.zeros(5, dtype=torch.int64), "half": torch.zeros(6)}
    assert read_safetensors_into(tmp_path / "w.safetensors", targets) == []
    assert torch.equal(tied, shared) and torch.equal(targets["ids"], source["ids"])
    assert torch.equal(targets["half"], source["half"].float())
    # Tied names holding different tensors, and a file cut short, are reported.
    write_safetensors(tmp_path / "x.safetensors", {**source, "tied": shared + 1}.items())
    assert read_safetensors_into(tmp_path / "x.safetensors", targets) == [("a", "tied")]
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 8])
    with pytest.raises(CheckpointError, match="cut.safetensors: half: bytes .* truncated"):
        read_safetensors_into(tmp_path / "cut.safetensors", targets)


@dataclass
class ZeroRun:
    stage: int
    output_dir: Path
    # The run's arguments but its output_dir: a resumed run takes the same.
    args: list[str]
    # What the engine held after the last step (tests/train_and_dump.py).
    live: dict[str, Any]


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda stage: f"zero{stage}")
def zero_run(request, tmp_path_factory, tiny_shards) -> ZeroRun:  # noqa: F811
    """A 2-rank fp32 run of the debug model, checkpointed at RESUME_STEP and after its last step,
    without dropout (its random stream differs between world sizes) for the resume on one rank."""
    stage = request.param
    tmp = tmp_path_factory.mktemp(f"zero{stage}")
    args = [*BASE, *_data_args(tiny_shards), "train.precision=fp32", f"train.duration={STEPS}",
            f"train.checkpoint_every={RESUME_STEP}", f"train.zero_stage={stage}", "model.hidden_dropout=0.0",
            "tracking.enabled=false"]  # fmt: skip
    out = tmp / "run"
    _assert_ok(*launch(tmp, [*args, f"train.output_dir={out}", "--dump", str(tmp / "live.pt")], script=DUMP_SCRIPT))
    return ZeroRun(stage, out, args, torch.load(tmp / "live.pt", weights_only=True))


def _logits(model: MaskedLM) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(probe_input(model.config.vocab_size)).logits


@pytest.mark.slow
def test_zero_checkpoint_converts_to_release_equal_to_live_master_weights(zero_run, tmp_path):
    run = zero_run.output_dir
    release = convert_checkpoint(run, tmp_path / "release", "release")
    weights = load_file(str(release / "model.safetensors"))
    model = load_release(release)
    assert weights.keys() == model.state_dict().keys()
    live = {**zero_run.live["weights"], **zero_run.live["buffers"]}
    # The engine names each shared tensor (tied decoder, Sin frequencies shared across filters) once.
    add_shared_names(live, model)
    assert live.keys() == weights.keys()
    for name, tensor in weights.items():
        assert tensor.dtype == live[name].dtype and torch.equal(tensor, live[name]), name
    # The engine's model ran on 2 ranks, this one in one process: same fp32 arithmetic but for the
    # order of some sums.
    torch.testing.assert_close(_logits(model), zero_run.live["logits"], rtol=1e-5, atol=1e-5)

    assert (release / "vocab.txt").read_text().startswith("[PAD]")
    meta = json.loads((release / "config.json").read_text())
    assert meta["task"] == "mlm" and meta["model"]["hidden_size"] == 128
    client = torch.load(run / "checkpoints" / f"step_{STEPS:08d}" / "client_state.pt", weights_only=True)
    card = (release / MODEL_CARD).read_text()
    assert f"Final training MLM loss: {client['losses'][-1][1]:.4f} (step {STEPS})" in card
    assert f"tokens seen: {client['tokens_seen']:,}" in card and str(run.resolve()) in card

    if zero_run.stage == 2:
        half = convert_checkpoint(run / "checkpoints", tmp_path / "bf16", "release", tag=f"step_{STEPS:08d}", bf16=True)
        weights16 = load_file(str(half / "model.safetensors"))
        for name, tensor in live.items():
            expected = tensor.bfloat16() if tensor.is_floating_point() else tensor
            assert weights16[name].dtype == expected.dtype and torch.equal(weights16[name], expected), name
        # release -> upstream -> release is lossless.
        upstream = convert_checkpoint(release, tmp_path / "upstream", "upstream")
        again = convert_checkpoint(upstream, tmp_path / "again", "release")
        back = load_file(str(again / "model.safetensors"))
        assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "convert_checkpoint.py"), *args],
        cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow
def test_universal_checkpoint_of_the_tool_resumes_on_one_rank(zero_run, tmp_path):
    """The tool's universal form of the 2-rank ZeRO-2 checkpoint at RESUME_STEP, put where the engine
    looks for it (<output_dir>/checkpoints/<tag>_universal beside <tag>), resumes a 1-rank run: the
    engine loads it as written, and the loss continues as in the 2-rank run, within the tolerance of
    tests/test_engine.py's 2 -> 1 resume (each rank's loss is a mean over its own masked tokens).
    ZeRO-1 checkpoints have the same layout and take the same path (state injected for DeepSpeed)."""
    if zero_run.stage != 2:
        pytest.skip("checked once, on the ZeRO-2 run")
    tag = f"step_{RESUME_STEP:08d}"
    checkpoints = tmp_path / "resumed" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(zero_run.output_dir / "checkpoints" / tag, checkpoints / tag)
    (checkpoints / "latest").write_text(tag + "\n")
    universal = checkpoints / (tag + "_universal")
    done = _cli(tmp_path, str(zero_run.output_dir), str(universal), "--to", "universal", "--tag", tag)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (universal / "COMPLETE").exists() and (universal / "client_state.pt").exists()
    # The fp32 weights and both Adam moments of every parameter, as the engine's universal load reads them.
    word_embeddings = universal / "zero" / "bert.embeddings.word_embeddings.weight"
    assert {p.name for p in word_embeddings.iterdir()} >= {"fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"}
    assert not list(checkpoints.glob(".*staging"))
    with pytest.raises(OutputExistsError, match="exists; pass overwrite=True"):
        convert_checkpoint(zero_run.output_dir, universal, "universal", tag=tag)

    written = (universal / "COMPLETE").stat().st_mtime_ns
    returncode, output = launch(
        tmp_path, [*zero_run.args, f"train.output_dir={checkpoints.parent}"], nproc=1, launcher="python"
    )
    _assert_ok(returncode, output)
    assert f"resumed from {universal} at step {RESUME_STEP}" in output and "1 rank(s)" in output
    assert (universal / "COMPLETE").stat().st_mtime_ns == written  # the tool's folder, not remade
    full, resumed = dict(final_losses(zero_run.output_dir)), dict(final_losses(checkpoints.parent))
    assert [resumed[s] for s in range(1, RESUME_STEP + 1)] == [full[s] for s in range(1, RESUME_STEP + 1)]
    for step in range(RESUME_STEP + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(full[step], rel=5e-3), (step, resumed[step], full[step])


@pytest.mark.slow
def test_consolidating_the_80M_zero2_checkpoint_holds_the_weights_once(tmp_path, tiny_shards):  # noqa: F811
    """A genuine ZeRO-2 checkpoint of configs/m2-bert-80M.yaml, made cheaply: one step of one sequence
    of 64 tokens in one process (1.2 GB: the module's fp32 weights, then the fp32 master weights and
    both Adam moments in the optimizer shard), converted by the tool, which reports its peak RSS."""
    run = tmp_path / "run"
    args = [*_data_args(tiny_shards), "train.seq_len=64", "train.global_batch_size=1", "train.micro_batch_size=0",
            "train.duration=1", "train.precision=fp32", "train.zero_stage=2", "train.eval_batches=1",
            "data.num_workers=0", "tracking.enabled=false", f"train.output_dir={run}"]  # fmt: skip
    _assert_ok(*launch(tmp_path, args, nproc=1, launcher="python", config="m2-bert-80M"))
    done = _cli(tmp_path, str(run), str(tmp_path / "release"), "--to", "release")
    assert done.returncode == 0, done.stderr[-3000:]
    peak, before = map(float, re.search(r"peak RSS ([\d.]+) MiB \(([\d.]+) MiB before", done.stdout).groups())
    weights_mib = count_parameters(empty_model(load_config("m2-bert-80M").model)) * 4 / 2**20
    print(f"80M model: fp32 weights {weights_mib:.1f} MiB; peak RSS {peak:.1f} MiB, {before:.1f} MiB before")
    # The conversion holds the fp32 weights about once at any time (the source model's are the
    # memory-mapped master weights themselves; the release is read back into a fresh model with plain
    # reads), plus the model's initialisation temporaries (~0.4x, measured at its construction) or,
    # earlier, DeepSpeed's read of the module's weights (1x): measured 1.5x. Reading the optimizer
    # shard whole would take 3x; DeepSpeed's zero_to_fp32, which concatenates the partitions, 2x
    # before the model (3.4x in all, measured).
    assert peak - before < 2 * weights_mib, (peak, before, weights_mib)


@pytest.mark.slow
def test_bad_sources_and_destinations_give_clear_errors(zero_run, tmp_path):
    run = zero_run.output_dir
    if zero_run.stage != 2:
        pytest.skip("checked once, on the ZeRO-2 run")
    tags = rf"\['step_{RESUME_STEP:08d}', 'step_{STEPS:08d}'\]"
    with pytest.raises(CheckpointError, match=rf"no checkpoint tag 'step_00000099'; complete tags: {tags}"):
        convert_checkpoint(run, tmp_path / "a", "release", tag="step_00000099")
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError, match="exists; pass overwrite=True"):
        convert_checkpoint(run, tmp_path / "exists", "release")
    broken = tmp_path / "broken"
    shutil.copytree(run / "checkpoints", broken)
    shard = next((broken / f"step_{STEPS:08d}").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(shard))}: \d+ bytes, the manifest says \d+ \(truncated"):
        convert_checkpoint(broken, tmp_path / "b", "release", tag=f"step_{STEPS:08d}")
    assert not (tmp_path / "b").exists()
