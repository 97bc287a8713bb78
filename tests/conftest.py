"""Shared test fixtures: the upstream checkpoint fixtures in tests/fixtures/ and the `gpu` marker."""

import os
from pathlib import Path

# Without a GPU, Triton kernels run in its interpreter, which must be chosen before ANY module
# defining @triton.jit functions is imported (triton's own included, which other tests may pull in).
if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
# Upstream's tiny checkpoints with their logits, and the released 80M key list (data, in the repository).
UPSTREAM_FIXTURES = REPO_ROOT / "tests" / "fixtures" / "upstream_m2"
UPSTREAM_KEY_LIST = UPSTREAM_FIXTURES / "M2_UPSTREAM_KEYS.txt"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def in_process_rank():
    """For a test that builds the training engine inside the test process: the engine fills the
    launcher's variables (MASTER_PORT...) in os.environ, which are restored afterwards, or every later
    test's launch would inherit a port that this process still listens on. The one-rank process
    group stays (DeepSpeed keeps its groups, so a later engine in this process reuses it). The TF32
    switch that the trainer sets (`train.tf32`) is restored too, for later tests' fp32 references."""
    saved = dict(os.environ)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    yield
    os.environ.clear()
    os.environ.update(saved)
    torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.fixture
def upstream_fixture_dir():
    if not UPSTREAM_FIXTURES.exists():
        pytest.fail(f"upstream fixtures not found at {UPSTREAM_FIXTURES}: part of the repository, restore them with git")
    return UPSTREAM_FIXTURES


@pytest.fixture(scope="session")
def embedded_dataset(tmp_path_factory):
    """The embedded corpus as train/val shards at L=64 with the bert-base-uncased vocab (the debug
    model's vocabulary), made once per test session."""
    from m2dist.data.corpus import prepare_default_dataset

    return prepare_default_dataset(tmp_path_factory.mktemp("embedded") / "L64", max_len=64)
