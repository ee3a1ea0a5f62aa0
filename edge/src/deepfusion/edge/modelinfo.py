"""What a model on disk is, without loading it: format, architecture, size, tokenizer, backends.

Three formats, told apart by what is on disk:
- `hf`: a transformers checkpoint directory (`config.json` + weights);
- `onnx`: a directory written by `deepfusion-edge export --format onnx` (`deepfusion-export.json`);
- `gguf`: a `.gguf` file (or a directory holding exactly one), with `tokenizer.json` beside it.

Only `tokenizers` (and `gguf` for GGUF files) are needed here: no torch, no runtime.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deepfusion.edge.backends import ModelShape
from deepfusion.edge.errors import ErrorCode, ModelError, require
from deepfusion.shared.fingerprint import tokenizer_fingerprint

__all__ = [
    "EXPORT_MANIFEST",
    "ModelInfo",
    "check_output_dir",
    "load_tokenizer",
    "model_info",
    "read_export_manifest",
    "read_hf_config",
    "shape_from_hf_config",
    "tokenizer_path",
]

EXPORT_MANIFEST = "deepfusion-export.json"

# transformers model_type -> (layers, width, context) config keys; others fall back to the Llama names.
_CONFIG_KEYS = {"gpt2": ("n_layer", "n_embd", "n_positions")}
_DEFAULT_KEYS = ("num_hidden_layers", "hidden_size", "max_position_embeddings")


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    format: str  # hf | onnx | gguf
    shape: ModelShape
    parameters: int | None
    file_bytes: int
    quantization: str
    tokenizer_fingerprint: str | None
    tokenizer_vocab: int | None
    backends: tuple[str, ...]  # the backends that can load this format (installed or not)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    """The `config.json` of a checkpoint directory, which must hold one JSON object.

    Checked before transformers sees the path: without a config.json it takes it for a Hub model id and
    fails offline with a traceback."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelError(
            ErrorCode.BAD_INPUT,
            f"{model_dir} is not a transformers checkpoint directory (no config.json)",
            "pass the checkpoint folder (the base models: `deepfusion-cloud models list`)",
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise ModelError(
            ErrorCode.CORRUPT_MODEL,
            f"{path} is unreadable ({type(exc).__name__}: {exc})",
            "copy the checkpoint again, or save it anew with save_pretrained",
        ) from None
    if not isinstance(config, dict):
        raise ModelError(
            ErrorCode.CORRUPT_MODEL,
            f"{path} holds a JSON {type(config).__name__}, not an object",
            "copy the checkpoint again, or save it anew with save_pretrained",
        )
    return config


def shape_from_hf_config(config: dict[str, Any]) -> ModelShape:
    model_type = str(config.get("model_type", "unknown"))
    layers, width, context = _CONFIG_KEYS.get(model_type, _DEFAULT_KEYS)
    try:
        return ModelShape(
            architecture=model_type,
            num_layers=int(config[layers]),
            hidden_size=int(config[width]),
            vocab_size=int(config["vocab_size"]),
            context=int(config.get(context) or config.get("n_ctx") or 2048),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(
            ErrorCode.UNSUPPORTED_ARCHITECTURE,
            f"config.json of a {model_type!r} model lacks {exc}",
            "use a decoder-only causal LM checkpoint (Llama, Qwen2, GPT-2 families)",
        ) from None


def checkpoint_config(model_dir: Path, families: tuple[str, ...], target: str, hint: str) -> dict[str, Any]:
    """The config.json of a checkpoint an exporter can handle, checked before any slow work.

    Raises `ModelError` when the directory is no transformers checkpoint, its family is not one of
    `families` (the ones `target` was checked on; `hint` says what to use instead), or it has no
    tokenizer.
    """
    config = read_hf_config(model_dir)
    model_type = config.get("model_type")
    if model_type not in families:
        raise ModelError(
            ErrorCode.UNSUPPORTED_ARCHITECTURE,
            f"{target} export supports {', '.join(families)}; this model is {model_type!r}",
            hint,
        )
    tokenizer_path(model_dir)
    return config


def check_output_dir(model_dir: Path, output_dir: Path) -> None:
    """An export goes to a folder of its own: written into the checkpoint, its files would overwrite or
    mix with the checkpoint's (config.json, tokenizer.json, the weights), and the folder's format
    (`model_info`) would change under it."""
    if output_dir.resolve() == model_dir.resolve():
        raise ModelError(
            ErrorCode.BAD_INPUT,
            f"the output folder {output_dir} is the checkpoint folder itself",
            "choose another --output folder",
        )


def tokenizer_path(model_path: Path) -> Path:
    """The `tokenizer.json` that belongs to a model directory or file."""
    directory = model_path if model_path.is_dir() else model_path.parent
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ModelError(
            ErrorCode.MISSING_TOKENIZER,
            f"no tokenizer.json in {directory}",
            "save the model's fast tokenizer beside it (tokenizer.save_pretrained(dir)); "
            "export copies it automatically",
        )
    return path


def load_tokenizer(model_path: Path) -> Any:
    """The model's fast tokenizer (`tokenizers.Tokenizer`, with character offsets)."""
    from tokenizers import Tokenizer

    path = tokenizer_path(model_path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust parser raises plain Exceptions
        raise ModelError(
            ErrorCode.MISSING_TOKENIZER, f"{path} is not a readable tokenizer: {exc}", "re-save the tokenizer"
        ) from None


def read_export_manifest(directory: Path) -> dict[str, Any]:
    """The export's manifest, checked for the fields its readers use (a foreign or truncated one fails)."""
    try:
        manifest: dict[str, Any] = json.loads((directory / EXPORT_MANIFEST).read_text())
        ModelShape(**manifest["shape"])
        int(manifest["hidden_states"])
        str(manifest["quantization"])
        return manifest
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            ErrorCode.CORRUPT_MODEL,
            f"{directory} has no readable {EXPORT_MANIFEST}: {type(exc).__name__}: {exc}",
            "export the model again with `deepfusion-edge export --format onnx`",
        ) from None


def gguf_file(path: Path) -> Path:
    if path.is_file():
        return path
    found = sorted(path.glob("*.gguf"))
    if len(found) != 1:
        raise ModelError(
            ErrorCode.BAD_INPUT, f"{path} holds {len(found)} .gguf files", "pass the .gguf file itself"
        )
    return found[0]


def read_gguf(path: Path) -> tuple[ModelShape, list[str], str]:
    """Shape, token list and file type of a GGUF file (metadata only; weights stay on disk)."""
    gguf = require("gguf")
    try:
        reader = gguf.GGUFReader(str(path))
        fields = {name: reader.fields[name] for name in reader.fields}

        def value(key: str) -> Any:
            return fields[key].contents()

        arch = str(value("general.architecture"))
        tokens = [str(t) for t in value("tokenizer.ggml.tokens")]
        file_type = int(value("general.file_type")) if "general.file_type" in fields else -1
        shape = ModelShape(
            architecture=arch,
            num_layers=int(value(f"{arch}.block_count")),
            hidden_size=int(value(f"{arch}.embedding_length")),
            vocab_size=len(tokens),
            context=int(value(f"{arch}.context_length")),
        )
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            ErrorCode.CORRUPT_MODEL,
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})",
            "export it again with `deepfusion-edge export --format gguf`",
        ) from None
    names = {0: "f32", 1: "f16", 7: "q8_0", 15: "q4_k_m", 2: "q4_0", 3: "q4_1"}
    return shape, tokens, names.get(file_type, f"type{file_type}")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fingerprint(model_path: Path) -> tuple[str | None, int | None]:
    try:
        tokenizer = load_tokenizer(model_path)
    except ModelError:
        return None, None
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return tokenizer_fingerprint(vocab), len(vocab)


def model_info(model_path: str | Path) -> ModelInfo:
    path = Path(model_path)
    if not path.exists():
        raise ModelError(ErrorCode.BAD_INPUT, f"{path} does not exist", "check the model path")
    if path.suffix == ".gguf" or (path.is_dir() and any(path.glob("*.gguf"))):
        path = gguf_file(path)
        shape, _, quant = read_gguf(path)
        fmt, params, backends = "gguf", None, ("llama_cpp",)
    elif (path / EXPORT_MANIFEST).is_file():
        manifest = read_export_manifest(path)
        shape = ModelShape(**manifest["shape"])
        fmt, params, quant, backends = (
            "onnx",
            manifest.get("parameters"),
            manifest["quantization"],
            ("onnxruntime",),
        )
    elif (path / "config.json").is_file():
        config = read_hf_config(path)
        shape = shape_from_hf_config(config)
        fmt, params, backends = "hf", _count_parameters(path), ("torch",)
        quant = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    else:
        raise ModelError(
            ErrorCode.BAD_INPUT,
            f"{path} is neither a transformers checkpoint, an ONNX export nor a GGUF file",
            "pass a directory with config.json, an `export --format onnx` directory, or a .gguf file",
        )
    fingerprint, vocab = _fingerprint(path)
    return ModelInfo(path, fmt, shape, params, _size(path), quant, fingerprint, vocab, backends)


def _count_parameters(directory: Path) -> int | None:
    """Parameter count from the safetensors headers (no weights are read).

    A sharded checkpoint counts the shards its `model.safetensors.index.json` names: a folder may hold
    the same weights again in another layout (Mistral's releases ship `consolidated.safetensors` beside
    the shards), which counting every file would add twice."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = json.loads(index.read_text())["weight_map"].values()
            files = sorted({directory / str(name) for name in shards})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelError(
                ErrorCode.CORRUPT_MODEL,
                f"{index} is unreadable ({type(exc).__name__}: {exc})",
                "copy the checkpoint again, or save it anew with save_pretrained",
            ) from None
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import SafetensorError, safe_open

    total = 0
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    shape = handle.get_slice(name).get_shape()
                    count = 1
                    for dim in shape:
                        count *= dim
                    total += count
        except (OSError, SafetensorError) as exc:  # a truncated or foreign file
            raise ModelError(
                ErrorCode.CORRUPT_MODEL,
                f"{file} is not a readable safetensors file ({type(exc).__name__}: {exc})",
                "copy the checkpoint again, or save it anew with save_pretrained",
            ) from None
    return total
