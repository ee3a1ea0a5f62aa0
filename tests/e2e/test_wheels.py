"""The three distributions build as wheels, and the edge installs alone without torch/transformers/boto3."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "transformers", "boto3", "botocore", "peft", "optimum"}


def pip(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_edge_wheel_installs_alone_without_heavy_dependencies(tmp_path):
    dist = tmp_path / "dist"
    built = pip(
        Path(sys.executable),
        "wheel",
        "--no-deps",
        "-w",
        str(dist),
        *(str(ROOT / p) for p in ("shared", "edge", "cloud")),
    )
    assert built.returncode == 0, built.stderr
    wheels = sorted(p.name for p in dist.glob("*.whl"))
    assert [w.split("-")[0] for w in wheels] == ["deepfusion_cloud", "deepfusion_edge", "deepfusion_shared"]

    env_dir = tmp_path / "edge-venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    edge_wheels = [str(p) for p in dist.glob("deepfusion_[se]*.whl")]
    installed = pip(python, "install", *edge_wheels)
    assert installed.returncode == 0, installed.stderr

    listed = json.loads(pip(python, "list", "--format=json").stdout)
    names = {entry["name"].lower().replace("_", "-") for entry in listed}
    assert {"deepfusion-edge", "deepfusion-shared"} <= names
    assert not names & HEAVY, f"the edge pulled {names & HEAVY}"

    check = subprocess.run(
        [str(python), "-c",
         "import deepfusion.edge, deepfusion.shared.packets, deepfusion.shared.mqtt, deepfusion.shared.store;"
         "import sys; assert 'torch' not in sys.modules and 'boto3' not in sys.modules;"
         "print(deepfusion.edge.__version__)"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    version = subprocess.run(
        [str(env_dir / "bin" / "deepfusion-edge"), "--version"], capture_output=True, text=True
    )
    assert version.stdout.strip() == f"deepfusion-edge {check.stdout.strip()}"
