"""The README's main job and its two set-up commands."""

import os
import re
import subprocess
import sys

import pytest

from m2dist.config import load_config
from m2dist.train import main as train_main
from m2dist.trainer import train_synthetic
from tests.conftest import REPO_ROOT


def test_debug_model_learns_on_synthetic_tokens():
    lines = []
    config = load_config("debug", ["train.duration=30"])
    _, result = train_synthetic(config, log=lines.append)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 1.0, result.losses
    assert any("tokens/s" in line and "ETA" in line for line in lines)


def test_cli_runs_and_reports_config_errors(capsys):
    train_main(["--config", "debug", "train.duration=2", "train.log_every=1"])
    assert "step     2/2" in capsys.readouterr().out
    completed = subprocess.run(
        [sys.executable, "m2dist/train.py", "--config", "debug", "model.hidden_sise=3"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2
    assert "debug.yaml" in completed.stderr and "model.hidden_sise: unknown key" in completed.stderr


def _readme_commands() -> dict[str, str]:
    """The fenced commands that follow the README's 'main job' and 'test suite' markers."""
    readme = (REPO_ROOT / "README.md").read_text()
    commands = {}
    for label in ("main job", "test suite"):
        match = re.search(rf"<!-- {label} -->\s*```(?:bash|sh)?\n(.+?)\n```", readme, re.S)
        assert match, f"README.md has no command after '<!-- {label} -->'"
        commands[label] = match.group(1).strip()
    return commands


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [
        line.strip()
        for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#") and not line.startswith("set ") and not line.startswith("cd ")
    ]
    assert ci_lines == [_readme_commands()["test suite"]]


@pytest.mark.slow
def test_readme_main_command_in_a_fresh_clone(tmp_path):
    """Command (a) verbatim in a fresh clone with a fresh virtual environment."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    completed = subprocess.run(
        ["bash", "-c", _readme_commands()["main job"]],
        cwd=clone, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", completed.stdout)]
    assert len(losses) >= 2 and losses[-1] < losses[0], completed.stdout[-2000:]
