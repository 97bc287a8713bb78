from pathlib import Path

import pytest
import torch

from kernels import blockdiag, fftconv
from m2dist.config import CONFIG_DIR, KERNEL_BACKENDS, load_config
from m2dist.errors import ConfigError

ALL_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
REQUIRED = {
    "debug", "bert-base", "m2-bert-80M", "m2-bert-80M-noln", "m2-bert-110M", "m2-bert-260M",
    "m2-bert-341M", "m2-bert-80M-2k", "m2-bert-80M-8k", "m2-bert-80M-32k",
}  # fmt: skip


def test_every_required_config_is_shipped():
    assert REQUIRED <= set(ALL_CONFIGS)


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_every_config_loads(name):
    config = load_config(name)
    assert config.name == name


def test_base_inheritance_and_sizes():
    assert load_config("m2-bert-110M").model.hidden_size == 960
    assert load_config("m2-bert-260M").model.hidden_size == 1536
    assert load_config("m2-bert-341M").model.hidden_size == 1792
    long = load_config("m2-bert-80M-32k")
    assert long.model.l_max == 32768 and long.model.hidden_size == 768
    # m2-bert-80M is the released model, with the mixer LayerNorm; -noln is the variant without.
    assert load_config("m2-bert-80M").model.pre_layernorm is True
    assert load_config("m2-bert-80M-noln").model.pre_layernorm is False
    bert = load_config("bert-base")
    assert bert.model.architecture == "bert"
    assert bert.train.optimizer.lr == pytest.approx(5e-4) and bert.train.mlm_probability == pytest.approx(0.15)
    recipe = load_config("m2-bert-80M").train.optimizer
    assert (recipe.lr, recipe.betas, recipe.eps, recipe.weight_decay) == (8e-4, (0.9, 0.98), 1e-6, 1e-5)


def test_overrides_are_typed():
    config = load_config("debug", ["model.hidden_size=256", "train.duration=3", "model.bidirectional=false"])
    assert config.model.hidden_size == 256 and config.train.duration == 3 and config.model.bidirectional is False
    # YAML 1.1 reads 5e-4 (no dot) as a string; the config takes it as the number.
    assert load_config("debug", ["train.optimizer.lr=5e-4"]).train.optimizer.lr == 5e-4


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, needles",
    [
        ("model:\n  hidden_sise: 64\n", ["bad.yaml", "model.hidden_sise", "unknown key", "hidden_size"]),
        ("model:\n  hidden_size: 64.5\n", ["bad.yaml", "model.hidden_size", "expected an integer", "64.5"]),
        ("model:\n  hidden_size: 66\n", ["bad.yaml", "model.hidden_size", "multiple of model.mlp_nblocks=4", "66"]),
        ("model:\n  l_max: 0\n", ["bad.yaml", "model.l_max", ">= 1", "0"]),
        ("model:\n  architecture: gpt\n", ["bad.yaml", "model.architecture", "'m2', 'bert'", "gpt"]),
        ("train:\n  optimizer:\n    lr: fast\n", ["bad.yaml", "train.optimizer.lr", "expected a number", "fast"]),
        ("model:\n  kernels:\n    fftconv: cuda\n", ["bad.yaml", "kernels.fftconv", "cuda"]),
        ("train:\n  seq_len: 512\n", ["bad.yaml", "train.seq_len", "model.l_max=128"]),
        ("model: [1, 2]\n", ["bad.yaml", "model", "mapping"]),
    ],
)
def test_bad_values_name_file_key_and_expectation(tmp_path, text, needles):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text))
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_error_in_a_base_file_names_that_file(tmp_path):
    (tmp_path / "parent.yaml").write_text("base: debug.yaml\nmodel:\n  hidden_sise: 64\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrain:\n  seq_len: 64\n")
    (tmp_path / "debug.yaml").write_text((CONFIG_DIR / "debug.yaml").read_text())
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "child.yaml")
    assert str(err.value).startswith(f"{tmp_path / 'parent.yaml'}: model.hidden_sise: unknown key"), str(err.value)
    assert f"a base of {tmp_path / 'child.yaml'}" in str(err.value)
    # A bad value in the child itself, or in an override, is still the child's.
    (tmp_path / "child.yaml").write_text("base: parent.yaml\nmodel:\n  hidden_sise: 32\n")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'child.yaml'}: model.hidden_sise"):
        load_config(tmp_path / "child.yaml")
    (tmp_path / "parent.yaml").write_text("base: debug.yaml\nmodel:\n  num_layers: 2\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\ntrain:\n  seq_len: 64\n")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'child.yaml'} with overrides model.num_layers=x: model.num_layers"):
        load_config(tmp_path / "child.yaml", ["model.num_layers=x"])


def test_bad_override_is_named():
    with pytest.raises(ConfigError, match=r"debug.yaml.*model.num_layers: expected an integer"):
        load_config("debug", ["model.num_layers=two"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config("debug", ["model.num_layers"])


def test_missing_file_lists_shipped_configs():
    with pytest.raises(ConfigError, match="no such config file.*m2-bert-80M"):
        load_config("m2-bert-999M")


def test_kernel_backends_are_the_ops_backends():
    assert set(KERNEL_BACKENDS) == set(fftconv.BACKENDS) == set(blockdiag.BACKENDS)


def test_seq_len_is_train_seq_len_or_model_l_max():
    assert load_config("debug", ["train.seq_len=0", "model.l_max=128"]).seq_len == 128
    assert load_config("debug", ["train.seq_len=64", "model.l_max=128"]).seq_len == 64


def test_compile_with_zero_3_is_refused_by_name():
    assert load_config("debug", ["train.compile=true", "train.zero_stage=2"]).train.compile is True
    with pytest.raises(ConfigError, match=r"train.compile: expected false with train.zero_stage=3"):
        load_config("debug", ["train.compile=true", "train.zero_stage=3"])


def test_tf32_auto_is_on_for_bf16_runs_and_off_for_fp32_runs():
    from m2dist.engine.deepspeed_config import uses_tf32

    def tf32(*overrides):
        return uses_tf32(load_config("debug", list(overrides)).train)

    assert tf32("train.precision=bf16") and not tf32("train.precision=fp32")
    assert tf32("train.precision=fp32", "train.tf32=true") and not tf32("train.precision=bf16", "train.tf32=false")
    with pytest.raises(ConfigError, match=r"train.tf32: expected one of 'auto', True, False, got 'fast'"):
        load_config("debug", ["train.tf32=fast"])


def test_compile_auto_is_cuda_graphs_on_one_gpu_with_zero_0_to_2_and_eager_elsewhere():
    from m2dist.engine.trainer import resolve_compile_mode

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    train = load_config("debug").train
    assert train.compile == "auto"
    assert resolve_compile_mode(train, cuda, world_size=1) == "reduce-overhead"
    assert resolve_compile_mode(train, cuda, world_size=8) is None
    assert resolve_compile_mode(train, cpu, world_size=1) is None
    assert resolve_compile_mode(load_config("debug", ["train.zero_stage=3"]).train, cuda, 1) is None
    assert resolve_compile_mode(load_config("debug", ["train.compile=false"]).train, cuda, 1) is None
    explicit = load_config("debug", ["train.compile=true", "train.compile_mode=default"]).train
    assert resolve_compile_mode(explicit, cpu, 1) == "default"
    assert resolve_compile_mode(explicit, cuda, 8) == "default"
    with pytest.raises(ConfigError, match=r"train.compile: expected one of 'auto', True, False, got 'maybe'"):
        load_config("debug", ["train.compile=maybe"])
