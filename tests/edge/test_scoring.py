"""`deepfusion-edge score` and `info`: text in, valid knowledge packets out, for every backend."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deepfusion.edge.cli import app
from deepfusion.shared.packets import decode

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def public_file(tmp_path_factory: pytest.TempPathFactory, held_out_texts: list[str]) -> Path:
    path = tmp_path_factory.mktemp("public") / "public-0.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in held_out_texts[:6]))
    return path


def _packets(folder: Path) -> list:
    return [decode(p.read_bytes()) for p in sorted(folder.glob("*.dfk"))]


@pytest.mark.parametrize("kind", ["hf", "onnx-int8", "gguf-q8_0"])
def test_score_writes_valid_packets(
    kind: str,
    tiny_llama: Path,
    onnx_exports: dict[str, Path],
    gguf_exports: dict[str, Path],
    public_file: Path,
    held_out_texts: list[str],
    tmp_path: Path,
) -> None:
    model = {"hf": tiny_llama, "onnx-int8": onnx_exports["int8"], "gguf-q8_0": gguf_exports["q8_0"]}[kind]
    out = tmp_path / "packets"
    args = [
        "score",
        str(model),
        "-i",
        str(public_file),
        "-o",
        str(out),
        "--top-k",
        "16",
        "--max-tokens",
        "96",
    ]
    result = runner.invoke(
        app, [*args, "--threads", "1", "--device", "pi-7", "--stages", "2", "--patches", "3"]
    )
    assert result.exit_code == 0, result.output
    packets = _packets(out)
    assert packets
    index = [json.loads(line) for line in (out / "sequences.jsonl").read_text().splitlines()]
    sequences = {s.sequence_id: s for p in packets for s in p.sequences()}
    assert sorted(sequences) == [entry["sequence_id"] for entry in index]
    header = packets[0].header
    assert header.device == "pi-7" and header.shard == "public-0" and header.top_k == 16
    assert header.stages == 2 and header.patches == 3
    # llama.cpp sees only the last hidden state: the packet carries the last stage only.
    assert header.feature_stages == ((1,) if kind.startswith("gguf") else (0, 1))
    assert header.feature_width == 192
    # Offsets address the window's own text: decoding the tokens' spans gives back that text.
    texts = [t for t in held_out_texts[:6]]
    for entry in index[:5]:
        seq = sequences[entry["sequence_id"]]
        window = texts[entry["record"]][entry["char_start"] : entry["char_end"]]
        assert seq.offsets[0, 0] == 0 and seq.offsets[-1, 1] == len(window)
        assert len(seq.token_ids) == entry["tokens"] <= 96
        assert seq.features is not None and seq.features.shape == (len(header.feature_stages), 3, 192)
        assert np.all(np.isfinite(seq.features.astype(np.float32)))


def test_scoring_again_into_a_folder_replaces_the_earlier_packets(
    tiny_llama: Path, public_file: Path, held_out_texts: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "packets"
    args = ["score", str(tiny_llama), "-o", str(out), "--top-k", "8", "--max-tokens", "64", "--threads", "1"]
    assert runner.invoke(app, [*args, "-i", str(public_file)]).exit_code == 0
    (out / "notes.dfk").write_bytes(b"a file of the user's")  # not a name the scorer gives: kept
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text(json.dumps({"text": held_out_texts[0]}) + "\n")
    result = runner.invoke(app, [*args, "-i", str(fewer)])
    assert result.exit_code == 0, result.output
    packets = [decode(p.read_bytes()) for p in sorted(out.glob("0*.dfk"))]
    index = [json.loads(line) for line in (out / "sequences.jsonl").read_text().splitlines()]
    assert sorted(s.sequence_id for p in packets for s in p.sequences()) == [e["sequence_id"] for e in index]
    assert (out / "notes.dfk").read_bytes() == b"a file of the user's"


def test_score_top_p_pads_rows(tiny_llama: Path, public_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "packets"
    args = [
        "score",
        str(tiny_llama),
        "-i",
        str(public_file),
        "-o",
        str(out),
        "--top-k",
        "64",
        "--top-p",
        "0.5",
    ]
    result = runner.invoke(app, [*args, "--threads", "1", "--stages", "0"])
    assert result.exit_code == 0, result.output
    packet = _packets(out)[0]
    assert packet.header.top_p == 0.5 and packet.features is None
    assert np.any(np.isneginf(packet.topk_logprobs.astype(np.float32)))  # shorter rows padded


@pytest.mark.parametrize("kind", ["hf", "onnx", "gguf"])
def test_info(
    kind: str, tiny_llama: Path, onnx_exports: dict[str, Path], gguf_exports: dict[str, Path]
) -> None:
    from deepfusion.cloud.zoo.tokenizer import fingerprint, load_tokenizer

    model = {"hf": tiny_llama, "onnx": onnx_exports["int8"], "gguf": gguf_exports["q4_k_m"]}[kind]
    result = runner.invoke(app, ["info", str(model), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["format"] == kind and data["shape"]["architecture"] == "llama"
    assert data["shape"]["num_layers"] == 4 and data["shape"]["hidden_size"] == 192
    assert data["tokenizer_fingerprint"] == fingerprint(load_tokenizer(tiny_llama))
    assert (
        data["backends_installed"] == {"hf": ["torch"], "onnx": ["onnxruntime"], "gguf": ["llama_cpp"]}[kind]
    )
    assert data["quantization"] in ("float32", "int8", "q4_k_m")
    table = runner.invoke(app, ["info", str(model)])
    assert table.exit_code == 0 and "fingerprint" in table.output


def test_info_counts_a_sharded_checkpoints_parameters_once(tiny_llama: Path, tmp_path: Path) -> None:
    """A sharded checkpoint (model-0000x-of-0000y.safetensors + index), with the same weights again in
    `consolidated.safetensors` as Mistral's releases ship them: `info` counts the model's parameters
    once."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    target = tmp_path / "sharded"
    model.save_pretrained(target, max_shard_size="2MB")
    assert len(list(target.glob("model-*-of-*.safetensors"))) > 1
    shutil.copy2(tiny_llama / "model.safetensors", target / "consolidated.safetensors")
    result = runner.invoke(app, ["info", str(target), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["parameters"] == model.num_parameters()


def test_score_stops_with_a_clear_error_when_the_last_window_is_too_large(
    tiny_llama: Path, held_out_texts: list[str], tmp_path: Path
) -> None:
    from deepfusion.edge.modelinfo import load_tokenizer

    public = tmp_path / "public.jsonl"
    text = " ".join(held_out_texts)
    end = load_tokenizer(tiny_llama).encode(text, add_special_tokens=False).offsets[199][1]
    long_text = text[:end]  # one window of 200 tokens, the last: about 800 KB raw at top-1024
    public.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["A short note.", long_text]))
    args = ["score", str(tiny_llama), "-i", str(public), "-o", str(tmp_path / "packets"), "--top-k", "1024"]
    result = runner.invoke(app, [*args, "--max-tokens", "256", "--threads", "1", "--stages", "0"])
    assert result.exit_code == 2, result.output
    assert "bad_input" in result.output and "sequence 1 alone encodes to" in result.output
    assert "--max-tokens" in result.output  # how to fix


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_a_text_file_that_is_not_utf8_is_a_clear_error(tmp_path: Path, suffix: str) -> None:
    from deepfusion.edge.errors import ModelError
    from deepfusion.edge.scoring import read_texts

    path = tmp_path / f"private{suffix}"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(ModelError, match=f"{path.name}:2 is not UTF-8 text"):
        list(read_texts(path))


@pytest.mark.parametrize(
    ("name", "content", "fault"),
    [
        ("list.jsonl", b'{"text": "ok"}\n\n[1, 2]\n', ':3 is not a JSON object with a string "text" field'),
        ("number.jsonl", b'{"text": 5}\n', ':1 is not a JSON object with a string "text" field'),
        ("far.txt", b"ok\n" * 5000 + b"caf\xe9\n", ":5001 is not UTF-8 text"),
    ],
)
def test_read_texts_names_the_line_at_fault(tmp_path: Path, name: str, content: bytes, fault: str) -> None:
    """A "text" that is not a string is refused, not scored as its repr; an undecodable byte far into
    the file is reported at its own line, not at the one being read when a chunk ahead failed."""
    from deepfusion.edge.errors import ModelError
    from deepfusion.edge.scoring import read_texts

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ModelError, match=re.escape(f"{name}{fault}")):
        list(read_texts(path))


def test_read_texts_reports_a_file_it_cannot_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Raised while reading, not only on the first text that `score` and `finetune` check up front."""
    from deepfusion.edge.errors import ModelError
    from deepfusion.edge.scoring import read_texts

    path = tmp_path / "private.txt"
    path.write_text("some text\n")

    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))  # chmod 000 would not stop root

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(ModelError, match=re.escape(f"{path} cannot be read (Permission denied)")):
        list(read_texts(path))


def test_inspect_prints_file_names_as_they_are(tmp_path: Path) -> None:
    """A "[" in a file name is text, not a rich style tag that vanishes or stops the command."""
    from deepfusion.shared.packets import encode
    from tests.shared.packet_factory import make_packet

    folder = tmp_path / "["
    folder.mkdir()
    good, bad = folder / "good].dfk", folder / "bad].dfk"  # paths ".../[/good].dfk", ".../[/bad].dfk"
    payload = encode(make_packet(seed=9))
    good.write_bytes(payload)
    bad.write_bytes(payload[:-5])
    result = runner.invoke(app, ["inspect", str(good)], env={"COLUMNS": "400"})
    assert result.exit_code == 0 and str(good) in result.output, result.output
    result = runner.invoke(app, ["inspect", str(bad)], env={"COLUMNS": "400"})
    assert result.exit_code == 1 and f"refused {bad}: corrupt_compression" in result.output, result.output
