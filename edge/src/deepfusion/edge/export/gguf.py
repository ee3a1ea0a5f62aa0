"""HF checkpoint -> GGUF (llama.cpp's own converter), then quantization through llama.cpp.

Supported families: Llama (incl. SmolLM2), Qwen2 and GPT-2, dense only; anything else fails with
`unsupported_architecture` before any work. The converter, `convert_hf_to_gguf.py` with its
`conversion/` and `gguf-py/` folders, ships only in the llama-cpp-python sdist (not in the wheel), so
the sdist of the installed version is fetched once with `pip download`, and just those files are
extracted into `$DEEPFUSION_CACHE/llama.cpp/<version>/`. The converter runs in a subprocess with the
sdist's `gguf-py` first on the path (PyPI's `gguf` is too old for it) and needs torch, transformers,
numpy and sentencepiece: export on a machine with `deepfusion-edge[train,gguf]`; the device that runs
the GGUF needs only `deepfusion-edge[gguf]`.

f16 is written by the converter directly; q8_0 and q4_k_m are quantized by
`llama_cpp.llama_model_quantize` from an f32 conversion. k-quants need rows that are multiples of
256: llama.cpp falls back to other types for narrower tensors (the tiny presets, SmolLM2's 576).
The output directory holds `model.<quant>.gguf` and the tokenizer files (the scorer tokenizes with
`tokenizer.json`; its vocabulary is checked against the GGUF's token list after conversion).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

from deepfusion.edge.errors import ErrorCode, ModelError, require
from deepfusion.edge.modelinfo import check_output_dir, checkpoint_config, read_gguf, tokenizer_path

__all__ = ["GGUF_FAMILIES", "GgufQuant", "converter_dir", "export_gguf", "gguf_vocab_check"]

GgufQuant = Literal["f16", "q8_0", "q4_k_m", "f32"]
GGUF_FAMILIES = ("llama", "qwen2", "gpt2")
DEFAULT_LLAMA_CPP_VERSION = "0.3.36"
_FTYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _cache_root() -> Path:
    from deepfusion.shared.corpora.cache import resolve_cache_root

    return resolve_cache_root()


def _llama_cpp_version() -> str:
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return DEFAULT_LLAMA_CPP_VERSION


def converter_dir(cache_root: Path | None = None, llama_cpp_version: str | None = None) -> Path:
    """`vendor/llama.cpp` of the llama-cpp-python sdist (converter only), fetched once per version."""
    release = llama_cpp_version or _llama_cpp_version()
    target = (cache_root or _cache_root()) / "llama.cpp" / release
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".sdist-") as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
            f"llama-cpp-python=={release}", "-d", tmp,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        archives = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise ModelError(
                ErrorCode.CONVERSION_FAILED,
                f"could not download the llama-cpp-python {release} sdist: {done.stderr.strip()[-500:]}",
                "check access to the package index (pip download llama-cpp-python), or set DEEPFUSION_CACHE "
                "to a cache that holds llama.cpp/<version>/",
            )
        staging = Path(tmp) / "llama.cpp"
        with tarfile.open(archives[0]) as archive:
            prefix = f"{archives[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
            members = [
                m
                for m in archive.getmembers()
                if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(_MEMBERS)
            ]
            for member in members:
                member.name = member.name[len(prefix) :]
            archive.extractall(staging, members=members, filter="data")
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise ModelError(
                ErrorCode.CONVERSION_FAILED,
                f"the llama-cpp-python {release} sdist holds no vendor/llama.cpp/convert_hf_to_gguf.py",
                f"pin llama-cpp-python=={DEFAULT_LLAMA_CPP_VERSION}",
            )
        staging.replace(target)
    return target


def _check_source(model_dir: Path) -> None:
    config = checkpoint_config(
        model_dir, GGUF_FAMILIES, "GGUF", "use the ONNX export or the torch backend for this model"
    )
    if config["model_type"] == "gpt2" and "n_ctx" not in config:
        raise ModelError(
            ErrorCode.UNSUPPORTED_ARCHITECTURE,
            "llama.cpp's GPT-2 converter needs n_ctx in config.json",
            "add n_ctx (equal to n_positions) to config.json",
        )
    if _slides(config):
        raise ModelError(
            ErrorCode.UNSUPPORTED_ARCHITECTURE,
            f"this Qwen2 model attends through a sliding window of {config['sliding_window']} tokens in "
            "some layers (use_sliding_window), which llama.cpp's Qwen2 ignores: its scores would differ "
            "from torch's",
            "use the ONNX export or the torch backend for this model",
        )


def _slides(config: dict[str, Any]) -> bool:
    """Whether a Qwen2 config has layers whose attention transformers limits to a sliding window
    (`use_sliding_window`, from layer `max_window_layers` on), shorter than the model's context."""
    if config["model_type"] != "qwen2" or not config.get("use_sliding_window"):
        return False
    window, context = config.get("sliding_window"), config.get("max_position_embeddings")
    if not window or (context and window >= context):
        return False
    types = config.get("layer_types")
    if types:
        return "sliding_attention" in types
    return int(config.get("max_window_layers", 28)) < int(config.get("num_hidden_layers", 0))


def _convert(model_dir: Path, outfile: Path, outtype: str, vendor: Path) -> None:
    require("torch")
    require("transformers")
    script = Path(__file__).with_name("gguf_convert_main.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(vendor / "gguf-py"), str(vendor)])}
    command = [sys.executable, str(script), str(vendor), str(model_dir), "--outfile", str(outfile)]
    done = subprocess.run(
        [*command, "--outtype", outtype], capture_output=True, text=True, env=env, check=False
    )
    if done.returncode != 0 or not outfile.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise ModelError(
            ErrorCode.CONVERSION_FAILED,
            f"llama.cpp's converter failed on {model_dir}:\n{tail}",
            "check the model family and its tokenizer (tokenizer.json, no bogus tokenizer.model)",
        )


def _quantize(source: Path, target: Path, quant: str, threads: int | None) -> None:
    llama_cpp = require("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, _FTYPES[quant])
    params.nthread = threads or 0
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if code != 0 or not target.is_file():
        raise ModelError(
            ErrorCode.CONVERSION_FAILED, f"llama.cpp could not quantize {source} to {quant} (code {code})", ""
        )


def gguf_vocab_check(gguf_path: Path, tokens: list[str] | None = None) -> None:
    """The GGUF's token list (`tokens`, read from the file if not given) must start with the
    tokenizer's vocabulary, id for id."""
    from tokenizers import Tokenizer

    if tokens is None:
        _, tokens, _ = read_gguf(gguf_path)
    vocab = Tokenizer.from_file(str(tokenizer_path(gguf_path))).get_vocab(with_added_tokens=True)
    by_id = sorted(vocab, key=vocab.__getitem__)
    if len(by_id) > len(tokens) or tokens[: len(by_id)] != by_id:
        first = next((i for i, (a, b) in enumerate(zip(by_id, tokens, strict=False)) if a != b), len(tokens))
        raise ModelError(
            ErrorCode.VOCAB_MISMATCH,
            f"{gguf_path.name} has {len(tokens)} tokens that differ from tokenizer.json's {len(by_id)} "
            f"(first difference at id {first})",
            "keep the tokenizer.json that was exported with this GGUF beside it",
        )


def export_gguf(
    model_dir: str | Path,
    output_dir: str | Path,
    *,
    quant: GgufQuant = "q8_0",
    threads: int | None = None,
    cache_root: Path | None = None,
) -> Path:
    """Convert and quantize `model_dir`; return the path of `output_dir/model.<quant>.gguf`."""
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    if quant not in ("f16", "f32", *_FTYPES):
        raise ModelError(
            ErrorCode.BAD_INPUT, f"unknown GGUF quantization {quant!r}", "use f16, q8_0 or q4_k_m"
        )
    _check_source(model_dir)
    check_output_dir(model_dir, output_dir)
    vendor = converter_dir(cache_root)
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"model.{quant}.gguf"
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".gguf-") as tmp:
        if quant in ("f16", "f32"):
            _convert(model_dir, Path(tmp) / "model.gguf", quant, vendor)
        else:
            _convert(model_dir, Path(tmp) / "model.f32.gguf", "f32", vendor)
            _quantize(Path(tmp) / "model.f32.gguf", Path(tmp) / "model.gguf", quant, threads)
        (Path(tmp) / "model.gguf").replace(target)
    for name in _TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, output_dir / name)
    gguf_vocab_check(target)
    return target
