"""tools/convert_checkpoint.py on real training checkpoints: ZeRO-1/2/3 runs of 2 processes on CPU
converted to release folders, the upstream layout and DeepSpeed's universal form."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from m2dist.checkpoint.convert import MODEL_CARD, convert_checkpoint
from m2dist.checkpoint.io import CheckpointError, OutputExistsError
from m2dist.checkpoint.release import load_release
from m2dist.checkpoint.zero import add_shared_names, write_safetensors
from m2dist.models import MaskedLM
from tests.conftest import REPO_ROOT
from tests.test_engine import BASE, _assert_ok, _data_args, _env, launch, tiny_shards  # noqa: F401 (fixture)

STEPS = 3


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


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda stage: f"zero{stage}")
def zero_run(request, tmp_path_factory, tiny_shards):  # noqa: F811
    """A 2-rank fp32 run of the debug model, checkpointed after its last step."""
    stage = request.param
    tmp = tmp_path_factory.mktemp(f"zero{stage}")
    out = tmp / "run"
    args = [*BASE, *_data_args(tiny_shards), "train.precision=fp32", f"train.duration={STEPS}",
            f"train.zero_stage={stage}", f"train.output_dir={out}"]  # fmt: skip
    _assert_ok(*launch(tmp, args))
    return stage, out


def _deepspeed_fp32(run: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"))


def _logits(model: MaskedLM) -> torch.Tensor:
    input_ids = torch.randint(model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(input_ids).logits


@pytest.mark.slow
def test_zero_checkpoint_converts_to_release_equal_to_master_weights(zero_run, tmp_path):
    stage, run = zero_run
    release = convert_checkpoint(run, tmp_path / "release", "release")
    master = _deepspeed_fp32(run)
    weights = load_file(str(release / "model.safetensors"))
    model = load_release(release)
    assert weights.keys() == model.state_dict().keys() and master.keys() <= weights.keys()
    reference = MaskedLM(model.config)
    # DeepSpeed names each shared tensor (the Sin frequencies shared across filters) once.
    add_shared_names(master, reference)
    for name, tensor in weights.items():
        assert tensor.dtype == master[name].dtype and torch.equal(tensor, master[name]), name
    reference.load_state_dict(master, strict=True)
    assert torch.equal(_logits(model), _logits(reference))

    assert (release / "vocab.txt").read_text().startswith("[PAD]")
    meta = json.loads((release / "config.json").read_text())
    assert meta["task"] == "mlm" and meta["model"]["hidden_size"] == 128
    client = torch.load(run / "checkpoints" / f"step_{STEPS:08d}" / "client_state.pt", weights_only=True)
    card = (release / MODEL_CARD).read_text()
    assert f"Final training MLM loss: {client['losses'][-1][1]:.4f} (step {STEPS})" in card
    assert f"tokens seen: {client['tokens_seen']:,}" in card and str(run.resolve()) in card

    if stage == 2:
        half = convert_checkpoint(run / "checkpoints", tmp_path / "bf16", "release", tag=f"step_{STEPS:08d}", bf16=True)
        weights16 = load_file(str(half / "model.safetensors"))
        for name, tensor in master.items():
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
def test_cli_streams_with_bounded_memory_and_makes_universal(zero_run, tmp_path):
    stage, run = zero_run
    if stage == 3:
        pytest.skip("the CLI is exercised on ZeRO-1 (universal needs injected state) and ZeRO-2")
    if stage == 2:
        done = _cli(tmp_path, str(run), str(tmp_path / "release"), "--to", "release")
        assert done.returncode == 0, done.stderr[-3000:]
        peak, before = map(float, re.search(r"peak RSS ([\d.]+) MiB \(([\d.]+) MiB before", done.stdout).groups())
        weights_mib = sum(p.numel() for p in load_release(tmp_path / "release").parameters()) * 4 / 2**20
        # Above the baseline: the memory-mapped master-weight pages and DeepSpeed's merged fp32 vector
        # (2x), the source model for the logits check (1x) and its initialisation temporaries (~1x;
        # the reloaded release model comes after those are freed); 64 MiB for the probe's
        # activations and torch's first-use allocations. The Adam moments (2x more) are never read.
        print(f"debug model: weights {weights_mib:.1f} MiB, peak RSS {before:.1f} -> {peak:.1f} MiB")
        assert peak - before < 4 * weights_mib + 64, (peak, before, weights_mib)
    else:
        destination = tmp_path / "universal"
        done = _cli(tmp_path, str(run), str(destination), "--to", "universal")
        assert done.returncode == 0, done.stderr[-3000:]
        assert (destination / "COMPLETE").exists() and (destination / "client_state.pt").exists()
        # The fp32 weights and both Adam moments of every parameter, as the engine's universal load reads them.
        word_embeddings = destination / "zero" / "bert.embeddings.word_embeddings.weight"
        assert {p.name for p in word_embeddings.iterdir()} >= {"fp32.pt", "exp_avg.pt", "exp_avg_sq.pt"}
        assert not list(tmp_path.glob(".*staging"))
        again = _cli(tmp_path, str(run), str(destination), "--to", "universal")
        assert again.returncode == 2 and "exists; pass overwrite=True (--overwrite)" in again.stderr


@pytest.mark.slow
def test_bad_sources_and_destinations_give_clear_errors(zero_run, tmp_path):
    stage, run = zero_run
    if stage != 2:
        pytest.skip("checked once, on the ZeRO-2 run")
    with pytest.raises(CheckpointError, match=r"no checkpoint tag 'step_00000099'; complete tags: \['step_00000003'\]"):
        convert_checkpoint(run, tmp_path / "a", "release", tag="step_00000099")
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError, match="exists; pass overwrite=True"):
        convert_checkpoint(run, tmp_path / "exists", "release")
    broken = tmp_path / "broken"
    shutil.copytree(run / "checkpoints", broken)
    shard = next((broken / f"step_{STEPS:08d}").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(shard))}: truncated or corrupt checkpoint shard"):
        convert_checkpoint(broken, tmp_path / "b", "release")
    assert not (tmp_path / "b").exists()
