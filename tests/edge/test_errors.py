"""Bad input fails with a stable code and a fix: unsupported architecture, missing tokenizer, corrupt
GGUF, vocabulary mismatch, a runtime that is not installed, QLoRA without CUDA."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from deepfusion.edge.backends import load_backend
from deepfusion.edge.cli import app
from deepfusion.edge.errors import ErrorCode, ModelError

runner = CliRunner()


def _copy(source: Path, target: Path, skip: tuple[str, ...] = ()) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(*skip))
    return target


@pytest.fixture
def moe_model(tmp_path: Path, federation_tokenizer_dir: Path) -> Path:
    from deepfusion.cloud.zoo.presets import get_preset

    target = tmp_path / "moe"
    target.mkdir()
    get_preset("moe-qwen2-tiny").config(4096).save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(federation_tokenizer_dir / name, target / name)
    return target


@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_unsupported_architecture(fmt: str, moe_model: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", str(moe_model), "--format", fmt, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "unsupported_architecture" in result.output and "qwen2_moe" in result.output
    assert "how to fix" in result.output


def test_gguf_refuses_a_qwen2_with_sliding_window_attention(
    tmp_path: Path, federation_tokenizer_dir: Path
) -> None:
    """llama.cpp's Qwen2 attends over the whole context; a checkpoint with use_sliding_window limits
    its upper layers to the window in torch (and ONNX), so the GGUF would score differently."""
    from transformers import Qwen2Config

    target = tmp_path / "qwen2-swa"
    config = Qwen2Config(
        vocab_size=4096, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, use_sliding_window=True, sliding_window=32,
        max_window_layers=1,
    )  # fmt: skip
    config.save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(federation_tokenizer_dir / name, target / name)
    result = runner.invoke(app, ["export", str(target), "--format", "gguf", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "unsupported_architecture" in result.output and "sliding window" in result.output


def test_unknown_architecture_in_torch_backend(tmp_path: Path, federation_tokenizer_dir: Path) -> None:
    target = tmp_path / "bert"
    target.mkdir()
    config = {"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 8, "vocab_size": 10}
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as caught:
        load_backend("torch", target)
    assert caught.value.code is ErrorCode.UNSUPPORTED_ARCHITECTURE


def test_missing_tokenizer(random_models: dict[str, Path], tmp_path: Path) -> None:
    model = _copy(random_models["tiny-llama"], tmp_path / "m", skip=("tokenizer*", "special_tokens_map.json"))
    text = tmp_path / "t.txt"
    text.write_text("some public text\n")
    for args in (
        ["score", str(model), "-i", str(text), "-o", str(tmp_path / "p")],
        ["export", str(model), "--format", "onnx", "-o", str(tmp_path / "o")],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "missing_tokenizer" in result.output and "tokenizer.json" in result.output


@pytest.mark.slow
def test_corrupt_gguf(gguf_exports: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    source = gguf_exports["q8_0"]
    folder = _copy(source.parent, tmp_path / "g")
    broken = folder / source.name
    data = bytearray(broken.read_bytes())
    broken.write_bytes(bytes(data[: len(data) // 3]))  # truncated in transit
    with pytest.raises(ModelError) as caught:
        load_backend("llama_cpp", broken)
    assert caught.value.code is ErrorCode.CORRUPT_MODEL
    broken.write_bytes(b"NOPE" + bytes(data[4:]))  # not a GGUF at all
    result = runner.invoke(app, ["info", str(broken)])
    assert result.exit_code == 2 and "corrupt_model" in result.output


@pytest.mark.slow
def test_vocabulary_mismatch(gguf_exports: dict[str, Path], tiny_llama: Path, tmp_path: Path) -> None:
    """A tokenizer that is not the model's is refused, whether beside a GGUF or used for scoring."""
    pytest.importorskip("llama_cpp")
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = _copy(gguf_exports["q8_0"].parent, tmp_path / "g")
    other = Tokenizer(models.WordLevel({f"w{i}": i for i in range(5000)}, unk_token="w0"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other.save(str(folder / "tokenizer.json"))
    with pytest.raises(ModelError) as caught:
        load_backend("llama_cpp", folder / gguf_exports["q8_0"].name)
    assert caught.value.code is ErrorCode.VOCAB_MISMATCH
    # The torch model has 4,096 outputs: a 5,000-token tokenizer cannot be its own.
    model = _copy(tiny_llama, tmp_path / "m")
    other.save(str(model / "tokenizer.json"))
    text = tmp_path / "t.txt"
    text.write_text("w1 w4999 w2\n")
    result = runner.invoke(app, ["score", str(model), "-i", str(text), "-o", str(tmp_path / "p")])
    assert result.exit_code == 2 and "vocab_mismatch" in result.output
    # Ids beyond the vocabulary are refused by every backend.
    with load_backend("torch", tiny_llama) as backend, pytest.raises(ModelError) as caught:
        backend.score([np.array([1, 2, 4096])], top_k=4)
    assert caught.value.code is ErrorCode.VOCAB_MISMATCH


def test_missing_runtime_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import deepfusion.edge.backends as backends

    monkeypatch.setattr(backends, "find_spec", lambda name: None)
    with pytest.raises(ModelError) as caught:
        load_backend("llama_cpp", tmp_path)
    assert caught.value.code is ErrorCode.MISSING_EXTRA
    assert "deepfusion-edge[gguf]" in caught.value.fix


def test_qlora_without_bitsandbytes_names_the_extra(
    random_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    data = tmp_path / "d.txt"
    data.write_text("some private text " * 200)
    args = ["finetune", str(random_models["tiny-llama"]), "-d", str(data), "-o", str(tmp_path / "r")]
    result = runner.invoke(app, [*args, "--qlora"])
    assert result.exit_code == 2, result.output
    assert "missing_extra" in result.output and "deepfusion-edge[qlora]" in result.output


def test_qlora_on_cpu_needs_a_bitsandbytes_with_a_cpu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    import bitsandbytes

    from deepfusion.edge.finetune import _require_bitsandbytes

    monkeypatch.setattr(bitsandbytes, "__version__", "0.45.5")
    _require_bitsandbytes("cuda")  # older versions run 4-bit layers on CUDA
    with pytest.raises(ModelError) as caught:
        _require_bitsandbytes("cpu")
    assert caught.value.code is ErrorCode.MISSING_EXTRA and "CUDA only" in caught.value.message


def test_cuda_requested_without_cuda(random_models: dict[str, Path], tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = tmp_path / "d.txt"
    data.write_text("some private text " * 200)
    args = ["finetune", str(random_models["tiny-llama"]), "-d", str(data), "-o", str(tmp_path / "r")]
    result = runner.invoke(app, [*args, "--device", "cuda"])
    assert result.exit_code == 2 and "no_cuda" in result.output and "--device cpu" in result.output


def test_help_works_without_runtimes() -> None:
    """`--help` imports no runtime (they load lazily inside the commands)."""
    import subprocess
    import sys

    code = (
        "import sys; from deepfusion.edge.cli import app; "
        "runtimes = ('torch', 'transformers', 'onnxruntime', 'llama_cpp', 'optimum'); "
        "bad = [m for m in runtimes if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _damage_config_not_json(model: Path) -> None:
    (model / "config.json").write_text('{"model_type": "llama", ')  # cut short in transit


def _damage_config_not_an_object(model: Path) -> None:
    (model / "config.json").write_text("[]")


def _damage_weights_truncated(model: Path) -> None:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


@pytest.mark.parametrize(
    "damage", [_damage_config_not_json, _damage_config_not_an_object, _damage_weights_truncated]
)
def test_a_damaged_checkpoint_is_a_corrupt_model(damage: Any, tiny_llama: Path, tmp_path: Path) -> None:
    model = _copy(tiny_llama, tmp_path / "m")
    damage(model)
    result = runner.invoke(app, ["info", str(model)])
    assert result.exit_code == 2 and "corrupt_model" in result.output, result.output
    with pytest.raises(ModelError) as caught:
        load_backend("torch", model)
    assert caught.value.code is ErrorCode.CORRUPT_MODEL


@pytest.mark.parametrize("manifest", ['{"format": "onnx", "quantization": "int8"}', "[]", '{"shape": {}}'])
def test_a_foreign_export_manifest_is_a_corrupt_model(manifest: str, tmp_path: Path) -> None:
    from deepfusion.edge.modelinfo import EXPORT_MANIFEST

    (tmp_path / EXPORT_MANIFEST).write_text(manifest)
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and "corrupt_model" in result.output, result.output
    pytest.importorskip("onnxruntime")
    with pytest.raises(ModelError) as caught:
        load_backend("onnxruntime", tmp_path)
    assert caught.value.code is ErrorCode.CORRUPT_MODEL


def test_a_sequence_longer_than_the_context_is_bad_input(random_models: dict[str, Path]) -> None:
    """GPT-2's learned positions have no row past n_positions: a clear error, not an IndexError."""
    with load_backend("torch", random_models["tiny-gpt2"], threads=1) as backend:
        context = backend.shape.context
        with pytest.raises(ModelError) as caught:
            backend.score([np.zeros(context + 1, dtype=np.int64)], top_k=4)
    assert caught.value.code is ErrorCode.BAD_INPUT and f"context of {context}" in caught.value.message


@pytest.fixture
def nan_model(tiny_llama: Path, tmp_path: Path) -> Path:
    """tiny-llama with one NaN weight in block 1: every later hidden state, and every logit, is NaN."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    target = _copy(tiny_llama, tmp_path / "nan", skip=("*.safetensors",))
    model.save_pretrained(target)
    return target


@pytest.mark.parametrize("fmt", ["hf", "onnx", "gguf"])
def test_a_model_that_computes_nan_is_a_corrupt_model(fmt: str, nan_model: Path, tmp_path: Path) -> None:
    """The packet encoder would refuse NaN log-probs too, but as a packet error naming no model."""
    model = nan_model
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        from deepfusion.edge.export.onnx import export_onnx

        model = export_onnx(nan_model, tmp_path / "onnx", quant="fp32").parent
    elif fmt == "gguf":
        pytest.importorskip("llama_cpp")
        from deepfusion.edge.export.gguf import export_gguf

        model = export_gguf(nan_model, tmp_path / "gguf", quant="f32")
    text = tmp_path / "t.txt"
    text.write_text("some public text\n")
    args = ["score", str(model), "-i", str(text), "-o", str(tmp_path / "p"), "--threads", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "corrupt_model" in result.output and "NaN" in result.output


def test_finetune_help_names_the_qlora_extra() -> None:
    result = runner.invoke(app, ["finetune", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "the [qlora] extra" in result.output, result.output


@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_an_export_into_the_checkpoint_folder_is_refused(fmt: str, tiny_llama: Path, tmp_path: Path) -> None:
    model = _copy(tiny_llama, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    result = runner.invoke(app, ["export", str(model), "--format", fmt, "-o", str(model / ".")])
    assert result.exit_code == 2 and "bad_input" in result.output, result.output
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before  # nothing written, nothing lost


def _said(result: Any) -> str:
    """The output with rich's line wrapping and box undone (they depend on the terminal width; a long
    path may still be cut, so tests look for the words around it)."""
    return " ".join(result.output.translate(str.maketrans("│╭╮╰╯", "     ")).split())


def test_scoring_no_text_keeps_the_earlier_packets(random_models: dict[str, Path], tmp_path: Path) -> None:
    model, output = random_models["tiny-llama"], tmp_path / "packets"
    text, empty = tmp_path / "t.txt", tmp_path / "empty.jsonl"
    text.write_text("some public text\n")
    empty.write_text("\n\n")
    assert runner.invoke(app, ["score", str(model), "-i", str(text), "-o", str(output)]).exit_code == 0
    before = sorted(output.glob("*.dfk"))
    result = runner.invoke(app, ["score", str(model), "-i", str(empty), "-o", str(output)])
    assert result.exit_code == 2, result.output
    assert "[bad_input]" in result.output and "holds no text" in _said(result)
    assert before and sorted(output.glob("*.dfk")) == before


@pytest.mark.parametrize("command", ["score", "finetune"])
def test_an_unreadable_text_file_is_bad_input(
    command: str, random_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = tmp_path / "private.txt"
    text.write_text("some text\n")
    real_open = Path.open

    def open_(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == text:  # chmod 000 would not stop a test run as root
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    flag = "-i" if command == "score" else "-d"
    args = [command, str(random_models["tiny-llama"]), flag, str(text), "-o", str(tmp_path / "out")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "cannot be read (Permission denied)" in _said(result)


@pytest.mark.parametrize("make", [lambda path: None, lambda path: path.mkdir()], ids=["missing", "no-config"])
def test_finetune_needs_a_checkpoint_directory(make: Any, tmp_path: Path) -> None:
    model, text = tmp_path / "base", tmp_path / "t.txt"
    make(model)
    text.write_text("some text\n")
    result = runner.invoke(app, ["finetune", str(model), "-d", str(text), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "is not a transformers checkpoint directory (no config.json)" in _said(result)


@pytest.mark.parametrize(
    "args",
    [["score", "-i", "{text}"], ["finetune", "-d", "{text}", "--steps", "1"], ["export", "--format", "onnx"]],
    ids=["score", "finetune", "export"],
)
def test_an_output_folder_that_is_a_file_is_refused(
    args: list[str], random_models: dict[str, Path], tmp_path: Path
) -> None:
    text, taken = tmp_path / "t.txt", tmp_path / "notes.txt"
    text.write_text("some public text\n" * 200)
    taken.write_text("keep me")
    options = [arg.format(text=text) for arg in args[1:]]
    result = runner.invoke(app, [args[0], str(random_models["tiny-llama"]), *options, "-o", str(taken)])
    assert result.exit_code == 2, result.output
    assert "is a file" in _said(result) and taken.read_text() == "keep me"


@pytest.mark.parametrize(
    ("option", "value"),
    [("--device", "Pi 7"), ("--shard", "a/b"), ("--federation", ""), ("--top-p", "0"), ("--top-k", "5000"),
     ("--stages", "65")],
)  # fmt: skip
def test_score_refuses_a_packet_header_it_could_not_write(
    option: str, value: str, random_models: dict[str, Path], tmp_path: Path
) -> None:
    text = tmp_path / "t.txt"
    text.write_text("some public text\n")
    model = str(random_models["tiny-llama"])
    result = runner.invoke(app, ["score", model, "-i", str(text), "-o", str(tmp_path / "p"), option, value])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in _said(result)


def test_score_names_the_shard_after_a_long_file_name(random_models: dict[str, Path], tmp_path: Path) -> None:
    from deepfusion.shared.packets import decode

    text = tmp_path / ("notes-" + "x" * 100 + ".txt")
    text.write_text("some public text\n")
    output, model = tmp_path / "p", str(random_models["tiny-llama"])
    result = runner.invoke(app, ["score", model, "-i", str(text), "-o", str(output)])
    assert result.exit_code == 0, result.output
    (packet,) = output.glob("*.dfk")
    assert decode(packet.read_bytes()).header.shard == ("notes-" + "x" * 100)[:64]
