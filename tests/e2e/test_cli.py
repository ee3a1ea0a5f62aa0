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


def _said(result: subprocess.CompletedProcess[str]) -> str:
    """stderr with rich's box and line wrapping undone."""
    return " ".join(result.stderr.translate(str.maketrans("│╭╮╰╯", "     ")).split())


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.txt", b"", "holds no text"),
        ("blank.jsonl", b"\n  \n", "holds no text"),
        ("binary.txt", b"ok\n\xff\xfe\n", "is not UTF-8 text"),
        ("list.jsonl", b"[1, 2]\n", "is not a JSON object with a string"),
        ("number.jsonl", b'{"text": "ok"}\n{"text": 5}\n', "is not a JSON object with a string"),
    ],
)
def test_shards_publish_refuses_a_bad_source_before_publishing(tmp_path, name, content, reason):
    source, store = tmp_path / name, tmp_path / "store"
    source.write_bytes(content)
    result = run(
        "deepfusion-cloud", "shards", "publish", str(source), "--name", "news", "--per-shard", "1",
        "--set", f"store.uri={store}",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert reason in _said(result) and "Traceback" not in result.stderr
    assert not store.exists()  # no first shards published ahead of the bad line


def test_shards_publish_refuses_a_bad_name(tmp_path):
    source = tmp_path / "t.txt"
    source.write_text("some text\n")
    store = f"store.uri={tmp_path / 'store'}"
    result = run("deepfusion-cloud", "shards", "publish", str(source), "--name", "Bad Name", "--set", store)
    assert result.returncode == 2 and "Invalid value for '--name'" in _said(result)


@pytest.mark.parametrize("command", [("data", "list"), ("data", "prepare"), ("models", "list")])
def test_a_cache_dir_that_is_a_file_is_refused(tmp_path, command):
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me")
    result = run("deepfusion-cloud", *command, "--cache-dir", str(taken))
    assert result.returncode == 2 and "is a file" in _said(result) and taken.read_text() == "keep me"


def test_an_unknown_preset_names_the_option(tmp_path):
    result = run("deepfusion-cloud", "models", "prepare", "--cache-dir", str(tmp_path), "--preset", "nope")
    assert result.returncode == 2
    assert "Invalid value for --preset: unknown preset 'nope'" in _said(result)
