"""The console scripts as a user runs them: --version, --help and the packet inspector."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from deepfusion.shared.packets import encode
from tests.shared.packet_factory import make_packet

BIN = Path(sys.executable).parent


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("program", ["deepfusion-edge", "deepfusion-cloud"])
def test_version_and_help(program):
    version = run(program, "--version")
    assert version.returncode == 0
    assert re.fullmatch(rf"{program} \d+\.\d+\.\d+\n", version.stdout)
    help_text = run(program, "--help")
    assert help_text.returncode == 0 and "Usage" in help_text.stdout and "MQTT" in help_text.stdout


def test_inspect_tells_valid_from_refused(tmp_path):
    good, bad = tmp_path / "good.dfk", tmp_path / "bad.dfk"
    payload = encode(make_packet(seed=9))
    good.write_bytes(payload)
    bad.write_bytes(payload[:-5])
    assert run("deepfusion-edge", "inspect", str(good)).returncode == 0
    result = run("deepfusion-edge", "inspect", str(good), str(bad))
    assert result.returncode == 1
    assert f"refused {bad}: corrupt_compression" in result.stdout
    assert f"refused {good}" not in result.stdout
