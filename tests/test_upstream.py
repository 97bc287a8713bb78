"""Upstream M2-BERT checkpoints: numerics against upstream's own logits, keys, round trips, safety."""

import json
import pickle

import pytest
import torch

from m2dist.checkpoint.convert import convert_checkpoint
from m2dist.checkpoint.release import load_release, save_release
from m2dist.checkpoint.upstream import export_upstream, import_upstream, upstream_state_dict
from m2dist.config import load_config
from m2dist.errors import CheckpointError
from m2dist.models import MaskedLM, SequenceClassifier
from tests.conftest import UPSTREAM_KEY_LIST


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("name, pre_layernorm", [("m2-tiny", False), ("m2-tiny-preln", True)])
def test_imported_fixture_reproduces_upstream_logits(upstream_fixture_dir, name, pre_layernorm):
    folder = upstream_fixture_dir / name
    model = import_upstream(folder).eval()
    assert model.config.pre_layernorm is pre_layernorm
    reference = torch.load(folder / "reference.pt", weights_only=True)
    with torch.no_grad():
        assert _relative_error(model(reference["input_ids"]).logits, reference["logits"]) < 1e-5
        # Shorter than l_max: the filters use the first L positions, FFT size 2L.
        assert _relative_error(model(reference["input_ids_short"]).logits, reference["logits_short"]) < 1e-5


def _read_key_list():
    keys = {}
    for line in UPSTREAM_KEY_LIST.read_text().splitlines():
        name, shape, dtype = line.split("\t")
        keys[name] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
    return keys


def test_export_of_80M_has_exactly_the_released_keys():
    model = MaskedLM(load_config("m2-bert-80M").model)
    exported = upstream_state_dict(model)
    released = _read_key_list()
    assert list(exported) == list(released)  # names and order
    for key, (shape, dtype) in released.items():
        assert (tuple(exported[key].shape), str(exported[key].dtype)) == (shape, dtype), key


@pytest.mark.parametrize("layout", ["folder-bin", "folder-safetensors", "composer-pt"])
def test_export_import_round_trip_is_exact(tmp_path, layout):
    torch.manual_seed(0)
    model = MaskedLM(load_config("debug").model)
    destination = tmp_path / ("model.pt" if layout == "composer-pt" else "model")
    export_upstream(model, destination, safetensors=layout == "folder-safetensors")
    if layout == "composer-pt":
        raw = torch.load(destination, weights_only=True)
        assert all(k.startswith("model.") for k in raw["state"]["model"])
    else:
        upstream_config = json.loads((destination / "config.json").read_text())
        assert upstream_config["hidden_size"] == 128 and upstream_config["hyena_training_additions"] is False
    reloaded = import_upstream(destination)
    original, restored = model.state_dict(), reloaded.state_dict()
    assert list(original) == list(restored)
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    with pytest.raises(FileExistsError, match="overwrite"):
        export_upstream(model, destination)


def test_classifier_round_trip(tmp_path):
    config = load_config("debug").model
    model = SequenceClassifier(config, num_labels=3)
    export_upstream(model, tmp_path / "cls")
    reloaded = import_upstream(tmp_path / "cls")
    assert isinstance(reloaded, SequenceClassifier) and reloaded.num_labels == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))


def test_release_round_trip_and_conversions(tmp_path, upstream_fixture_dir):
    release = convert_checkpoint(upstream_fixture_dir / "m2-tiny-preln", tmp_path / "release", "release")
    model = load_release(release)
    assert model.config.pre_layernorm
    exported = convert_checkpoint(release, tmp_path / "back", "upstream")
    original = torch.load(upstream_fixture_dir / "m2-tiny-preln" / "pytorch_model.bin", weights_only=True)
    back = torch.load(exported / "pytorch_model.bin", weights_only=True)
    assert list(back) == list(original)
    assert all(torch.equal(back[k], original[k]) for k in original)
    with pytest.raises(FileExistsError):
        save_release(model, release)


def _corrupt(tmp_path, upstream_fixture_dir, edit):
    source = upstream_fixture_dir / "m2-tiny"
    state = torch.load(source / "pytorch_model.bin", weights_only=True)
    edit(state)
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "config.json").write_text((source / "config.json").read_text())
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_corrupted_state_dict_lists_every_bad_key(tmp_path, upstream_fixture_dir):
    def edit(state):
        del state["bert.encoder.layer.1.mlp.wo.bias"]
        del state["cls.predictions.transform.dense.weight"]
        state["bert.encoder.layer.0.attention.surprise"] = torch.zeros(3)
        state["bert.encoder.layer.0.mlp.gated_layers.weight"] = torch.zeros(4, 16, 16)

    with pytest.raises(CheckpointError) as err:
        import_upstream(_corrupt(tmp_path, upstream_fixture_dir, edit))
    message = str(err.value)
    for needle in [
        "missing keys",
        "bert.encoder.layer.1.mlp.wo.bias",
        "cls.predictions.transform.dense.weight",
        "unexpected keys",
        "bert.encoder.layer.0.attention.surprise",
        "misshaped keys",
        "bert.encoder.layer.0.mlp.gated_layers.weight: expected (4, 128, 16), got (4, 16, 16)",
    ]:
        assert needle in message, needle


def test_shared_tensors_that_differ_are_an_error(tmp_path, upstream_fixture_dir):
    def edit(state):
        key = "bert.encoder.layer.0.attention.filter_fn.implicit_filter_rev.3.freq"
        state[key] = state[key] + 1.0  # a new tensor: the saved aliases share storage

    with pytest.raises(CheckpointError, match="shared in the model hold different tensors.*implicit_filter_rev.3.freq"):
        import_upstream(_corrupt(tmp_path, upstream_fixture_dir, edit))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_with_code_payload_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state": {"model": {"model.x": _Payload(marker)}}}, f)
    with pytest.raises(CheckpointError, match="evil.pt: refused"):
        import_upstream(path)
    assert not marker.exists()


def test_unsupported_upstream_variant_is_named(tmp_path, upstream_fixture_dir):
    folder = _corrupt(tmp_path, upstream_fixture_dir, lambda state: None)
    upstream_config = json.loads((folder / "config.json").read_text())
    upstream_config["use_glu_mlp"] = False
    (folder / "config.json").write_text(json.dumps(upstream_config))
    with pytest.raises(CheckpointError, match="config.json: use_glu_mlp=False is not supported"):
        import_upstream(folder)
