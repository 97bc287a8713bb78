"""The README's two set-up commands, and the main job they run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


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
        if line.strip() and not line.lstrip().startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert ci_lines == [_readme_commands()["test suite"]]


def test_entry_point_reports_config_errors_in_one_line():
    completed = subprocess.run(
        [sys.executable, "m2dist/train.py", "--config", "configs/debug.yaml", "model.hidden_sise=3"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert completed.returncode == 2
    assert completed.stderr.startswith("error: ") and "Traceback" not in completed.stderr
    assert "debug.yaml" in completed.stderr and "model.hidden_sise: unknown key" in completed.stderr


def test_main_command_installs_as_the_test_command_does():
    """CI runs command (b) in a fresh clone and virtual environment; command (a) installs the same
    way (without the test extra), so that run proves (a)'s install too."""
    install_a, _, run_a = _readme_commands()["main job"].rpartition(" && ")
    install_b, _, run_b = _readme_commands()["test suite"].rpartition(" && ")
    assert install_a == install_b.replace("-e '.[test]'", "-e .")
    assert run_a.startswith("OMP_NUM_THREADS=1 .venv/bin/deepspeed --num_gpus 2 m2dist/train.py")


@pytest.mark.slow
def test_readme_main_job_in_a_fresh_clone(tmp_path):
    """The run part of command (a) in a fresh clone, with this environment's installation and a
    shorter duration: 2 ranks on the CPU prepare the embedded corpus and train the debug model,
    the loss falls, a checkpoint and an MLflow run exist."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "MLFLOW_"))}
    env.update(TMPDIR=str(tmp_path))
    run_a = _readme_commands()["main job"].rpartition(" && ")[2]
    command = run_a.replace(".venv/bin/", f"{Path(sys.executable).parent}/") + " train.duration=60"
    completed = subprocess.run(["bash", "-c", command], cwd=clone, env=env, capture_output=True, text=True, timeout=900)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-5000:]
    assert "2 rank(s)" in output
    losses = [float(x) for x in re.findall(r"^step\s+\d+/\d+\s+loss (\d+\.\d+)", completed.stdout, re.M)]
    assert len(losses) >= 5 and losses[-1] < losses[0] - 0.5, losses
    assert (clone / "outputs" / "debug" / "checkpoints" / "latest").exists()
    assert (clone / "outputs" / "debug" / "mlflow.db").exists()
    assert "mlflow ui --backend-store-uri" in completed.stdout
