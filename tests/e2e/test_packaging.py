"""The deployment files: the cloud's install script keeps the base image's torch, the Dockerfile and
compose file run real commands, and the device check installs deepfusion-edge[gguf] without torch."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import venv
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepfusion.cloud.cli import app
from deepfusion.cloud.settings import load_cloud_config

ROOT = Path(__file__).resolve().parents[2]
CLOUD = ROOT / "packaging" / "cloud"
IMAGE_ENTRYPOINT = ["deepfusion-cloud"]


def pip(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip


def installed(python: Path) -> dict[str, str]:
    listed = json.loads(pip(python, "list", "--format=json").stdout)
    return {entry["name"].lower().replace("_", "-"): entry["version"] for entry in listed}


@pytest.mark.slow
def test_cloud_install_keeps_the_base_images_torch(tmp_path):
    dist = tmp_path / "dist"
    built = pip(
        Path(sys.executable), "wheel", "--no-deps", "-w", str(dist), str(ROOT / "shared"), str(ROOT / "cloud")
    )
    assert built.returncode == 0, built.stderr
    # The base image's torch: the build this workspace runs on (pip finds it locally or in its cache).
    env_dir = tmp_path / "cloud-venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    torch_version = version("torch")
    base = pip(python, "install", f"torch=={torch_version}")
    assert base.returncode == 0, base.stderr

    env = {**os.environ, "PYTHON": str(python), "OMP_NUM_THREADS": "1"}
    script = subprocess.run(
        [str(CLOUD / "install.sh"), str(dist)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        check=False,
    )
    assert script.returncode == 0, script.stdout[-3000:] + script.stderr[-3000:]
    assert f"keeping the installed torch {torch_version}" in script.stdout
    assert "deepfusion-cloud 0.1.0" in script.stdout
    packages = installed(python)
    assert packages["torch"] == torch_version
    assert {"deepfusion-cloud", "deepfusion-shared", "boto3", "transformers"} <= packages.keys()
    ingest_help = subprocess.run(
        [str(env_dir / "bin" / "deepfusion-cloud"), "ingest", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ingest_help.returncode == 0 and "--config" in ingest_help.stdout


def dockerfile_stages(path: Path) -> list[tuple[str, list[str]]]:
    """(stage name, instructions) per FROM, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            words = line.split()
            stages.append((words[3] if len(words) > 3 and words[2].upper() == "AS" else "", []))
        stages[-1][1].append(line)
    return stages


def test_dockerfile_runs_install_sh_with_the_files_it_needs():
    stages = dockerfile_stages(CLOUD / "Dockerfile")
    assert len(stages) == 2
    (builder, builder_lines), (_, runtime) = stages
    base = runtime[0].split()[1]
    match = re.fullmatch(r"pytorch/pytorch:(\d+)\.(\d+)\.\d+-cuda12\.\d+-cudnn9-runtime", base)
    assert match and (int(match[1]), int(match[2])) >= (2, 4), base

    builder_outputs = {
        w for line in builder_lines if line.startswith("RUN ") for w in re.findall(r"-w (\S+)", line)
    }
    copied: dict[str, str] = {}  # file name in the image -> its path there
    for _, lines in stages:
        for line in lines:
            if not line.startswith("COPY "):
                continue
            words = shlex.split(line)[1:]
            source_stage = next((w.split("=", 1)[1] for w in words if w.startswith("--from=")), None)
            *sources, dest = [w for w in words if not w.startswith("--")]
            for source in sources:
                if source_stage is None:
                    assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                else:
                    assert source_stage == builder and source in builder_outputs, f"COPY --from {source}"
                name = Path(source).name
                copied[name] = f"{dest.rstrip('/')}/{name}" if dest.endswith("/") else dest

    install = copied["install.sh"]
    assert any(line.startswith("RUN ") and install in line for line in runtime), "install.sh is never run"
    # install.sh takes constraints.txt from its own folder in the image.
    assert Path(copied["constraints.txt"]).parent == Path(install).parent
    assert f"ENTRYPOINT {json.dumps(IMAGE_ENTRYPOINT)}" in runtime
    assert any(line.startswith("USER ") and line.split()[1] not in ("root", "0") for line in runtime)


def interpolate(value: str) -> str:
    """Compose's ${NAME:-default} and ${NAME:?error}, with their defaults and a stand-in secret."""
    value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
    return re.sub(r"\$\{\w+:\?[^}]*\}", "s3cr3t-value", value)


def test_compose_services_run_real_commands():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((CLOUD / "compose.yaml").read_text())
    services = compose["services"]
    assert {"mosquitto", "s3", "s3-init", "coordinator", "trainer", "status"} <= services.keys()

    cloud = {name: s for name, s in services.items() if s.get("image", "").startswith("deepfusion-cloud")}
    runner = CliRunner()
    worker_ids = []
    for name, service in cloud.items():
        argv = [
            interpolate(a)
            for a in (service.get("entrypoint") or IMAGE_ENTRYPOINT) + service.get("command", [])
        ]
        assert argv[0] == "deepfusion-cloud", name
        # --help after the service's own options: click rejects an unknown option before printing help.
        result = runner.invoke(app, [*argv[1:], "--help"])
        assert result.exit_code == 0, f"{name}: {argv}\n{result.output}"
        overrides = [a.removeprefix("--set=") for a in argv if a.startswith("--set=")]
        config = load_cloud_config(None, overrides)  # every key exists and every value is valid
        assert config.mqtt.host == "mosquitto" and config.store.uri.startswith("s3://"), name
        assert "AWS_SECRET_ACCESS_KEY" in service["environment"], name
        if argv[1] == "ingest":
            worker_ids.append(config.ingest.worker_id)
    assert len(worker_ids) >= 2 and len(set(worker_ids)) == len(worker_ids), worker_ids
    assert {"ingest", "coordinator", "train", "status"} <= {
        (s.get("entrypoint") or IMAGE_ENTRYPOINT + s["command"])[1] for s in cloud.values()
    }
    assert "AWS_SECRET_ACCESS_KEY" not in str(services["mosquitto"])
    assert services["trainer"]["profiles"] == ["train"]
    assert services["trainer"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


@pytest.mark.slow
def test_edge_build_and_check_installs_gguf_only(tmp_path, gguf_q8_0):
    env = {**os.environ, "PYTHON": sys.executable}
    script = subprocess.run(
        [str(ROOT / "packaging" / "edge" / "build_and_check.sh"), str(gguf_q8_0), str(tmp_path)],
        capture_output=True, text=True, timeout=900, env=env, check=False,
    )  # fmt: skip
    assert script.returncode == 0, script.stdout[-3000:] + script.stderr[-3000:]
    assert "deepfusion-edge 0.1.0" in script.stdout
    assert re.search(r"architecture\s+│\s+llama", script.stdout), script.stdout
    packages = installed(tmp_path / "venv" / "bin" / "python")
    assert {"deepfusion-edge", "deepfusion-shared", "llama-cpp-python", "gguf"} <= packages.keys()
    assert not packages.keys() & {"torch", "transformers"}, sorted(packages)
