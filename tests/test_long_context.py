"""Warm start of a longer-context model (m2dist/checkpoint/extend.py), on a tiny model: l_max 16 -> 64."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from m2dist.checkpoint.convert import load_any
from m2dist.checkpoint.extend import extend_state_dict, warm_start
from m2dist.checkpoint.release import save_release
from m2dist.config import ModelConfig
from m2dist.engine.trainer import initialize_from
from m2dist.errors import CheckpointError
from m2dist.models import MaskedLM
from m2dist.models.m2 import HyenaFilter, init_weights, positional_features
from tests.test_engine import _assert_ok, launch, tiny_shards  # noqa: F401 (fixture)

TINY = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, l_max=16, filter_order=16, hidden_dropout=0.0)
L0, L1 = 16, 64


def _trained_like(config: ModelConfig, seed: int = 3) -> MaskedLM:
    """A model whose every tensor, z included, is off its initial value, as after training."""
    torch.manual_seed(seed)
    model = MaskedLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model.eval()


def _filter_z_keys(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if k.endswith("pos_emb.z")]


def test_extended_state_is_an_l1_model_state_with_the_trained_weights():
    source = _trained_like(TINY)
    state = source.state_dict()
    extended = extend_state_dict(state, L1)
    fresh = MaskedLM(dataclasses.replace(TINY, l_max=L1)).state_dict()
    assert {k: v.shape for k, v in extended.items()} == {k: v.shape for k, v in fresh.items()}
    table = "bert.embeddings.position_embeddings.weight"
    assert torch.equal(extended[table], state[table].repeat(4, 1))
    for key in extended:
        if key.endswith(("pos_emb.t", "position_ids")):
            assert torch.equal(extended[key], fresh[key]), key
        elif key != table and not key.endswith("pos_emb.z"):
            assert torch.equal(extended[key], state[key]), key
    z_init0, _ = positional_features(TINY.filter_emb_dim, L0)
    z_init1, _ = positional_features(TINY.filter_emb_dim, L1)
    for key in _filter_z_keys(state):
        # The trained deviation sits on the new grid: the ends and every (L1-1)/(L0-1) = 4.2 rows.
        deviation0, deviation1 = state[key] - z_init0, extended[key] - z_init1
        torch.testing.assert_close(deviation1[:, ::21], deviation0[:, ::5], atol=1e-6, rtol=0)
    # On inputs of length <= L0 the embeddings are the source's exactly; the long convolutions are not.
    model = MaskedLM(dataclasses.replace(TINY, l_max=L1)).eval()
    model.load_state_dict(extended, strict=True)
    input_ids = torch.randint(1, TINY.vocab_size, (2, L0), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.bert.embeddings(input_ids), source.bert.embeddings(input_ids))


def test_same_l_max_is_the_identity_and_a_fresh_model_extends_to_a_fresh_model():
    state = _trained_like(TINY).state_dict()
    same = extend_state_dict(state, L0)
    assert all(same[k] is state[k] for k in state)
    torch.manual_seed(0)
    fresh0 = MaskedLM(TINY).state_dict()
    fresh1 = MaskedLM(dataclasses.replace(TINY, l_max=40)).state_dict()
    extended = extend_state_dict(fresh0, 40)
    assert extended["bert.embeddings.position_embeddings.weight"].shape == (40, TINY.hidden_size)
    for key in _filter_z_keys(fresh0):
        assert torch.equal(extended[key], fresh1[key]), key


def test_filters_keep_their_shape_over_the_normalised_position():
    """The extended filter at t equals the trained one at t (stretched), unlike its first L0 taps."""
    short, long = dataclasses.replace(TINY, l_max=64), dataclasses.replace(TINY, l_max=256)
    torch.manual_seed(0)
    trained = HyenaFilter(short)
    init_weights(trained, short.initializer_range)
    with torch.no_grad():
        trained.pos_emb.z.add_(0.05 * torch.randn_like(trained.pos_emb.z))
    extended = HyenaFilter(long)
    extended.load_state_dict(extend_state_dict(trained.state_dict(), 256))
    with torch.no_grad():
        k_short_DL = trained.circular_filter(64)[:, :64]
        k_long_DL = extended.circular_filter(256)[:, :256]
    stretched_DL = F.interpolate(k_short_DL[None], size=256, mode="linear", align_corners=True)[0]
    scale = k_short_DL.abs().max()
    assert (k_long_DL - stretched_DL).abs().max() / scale < 0.03
    assert (k_long_DL[:, :64] - k_short_DL).abs().max() / scale > 0.3


def test_bad_sources_give_clear_errors(tmp_path):
    release = save_release(_trained_like(TINY), tmp_path / "release16")
    shorter = MaskedLM(dataclasses.replace(TINY, l_max=8))
    with pytest.raises(CheckpointError, match="release16: has l_max=16, longer than the target l_max=8"):
        warm_start(shorter, release)
    wider = MaskedLM(dataclasses.replace(TINY, l_max=L1, hidden_size=64))
    with pytest.raises(CheckpointError, match=r"release16: .*model.hidden_size=32 in the source, 64 in this config"):
        warm_start(wider, release)
    bert = MaskedLM(dataclasses.replace(TINY, l_max=L1, architecture="bert", num_attention_heads=2))
    with pytest.raises(CheckpointError, match=r"model.architecture='m2' in the source, 'bert' in this config"):
        warm_start(bert, release)
    with pytest.raises(CheckpointError, match="missing: no such checkpoint file or folder"):
        warm_start(shorter, tmp_path / "missing")


def test_a_resumed_run_ignores_init_from(tmp_path):
    model = MaskedLM(dataclasses.replace(TINY, l_max=L1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    line = initialize_from(model, str(tmp_path / "gone"), "step_00000001")
    assert line.endswith("not used: the run continues from its own checkpoint step_00000001")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_training_starts_from_the_extended_source(tmp_path, tiny_shards):
    """A 1-process run with train.init_from at l_max 64 from an l_max-16 release: with the learning
    rates at 1e-12 and no weight decay, its checkpoint after one step holds the extended source."""
    source = _trained_like(TINY)
    release = save_release(source, tmp_path / "release16")
    out = tmp_path / "run"
    frozen = [f"train.optimizer.{name}=1.0e-12" for name in ("lr", "filter_lr", "pos_emb_lr")]
    returncode, output = launch(
        tmp_path,
        ["model.hidden_size=32", "model.intermediate_size=64", "model.filter_order=16", "model.l_max=64",
         f"data.train={tiny_shards / 'train'}", "data.num_workers=0", "tracking.enabled=false",
         "train.global_batch_size=2", "train.precision=fp32", "train.duration=1", f"train.output_dir={out}",
         *frozen, "train.optimizer.weight_decay=0", "train.optimizer.filter_weight_decay=0",
         f"train.init_from={release}"],
        launcher="python",
    )  # fmt: skip
    _assert_ok(returncode, output)
    assert f"initialized from {release}: l_max 16 -> 64" in output
    trained = load_any(out).state_dict()
    for key, tensor in extend_state_dict(source.state_dict(), L1).items():
        torch.testing.assert_close(trained[key], tensor, rtol=0, atol=1e-8, msg=key)
