"""User-facing failures of the model tools: a stable code, what went wrong, and how to fix it."""

from __future__ import annotations

from enum import StrEnum
from importlib import import_module
from types import ModuleType

__all__ = ["ErrorCode", "ModelError", "require"]


class ErrorCode(StrEnum):
    """Stable codes (the CLI exits with 2 and prints the code, the message and the fix)."""

    MISSING_EXTRA = "missing_extra"
    UNSUPPORTED_ARCHITECTURE = "unsupported_architecture"
    MISSING_TOKENIZER = "missing_tokenizer"
    CORRUPT_MODEL = "corrupt_model"
    VOCAB_MISMATCH = "vocab_mismatch"
    BAD_INPUT = "bad_input"
    NO_CUDA = "no_cuda"
    CONVERSION_FAILED = "conversion_failed"


class ModelError(RuntimeError):
    def __init__(self, code: ErrorCode, message: str, fix: str) -> None:
        super().__init__(f"{code.value}: {message}\n  how to fix: {fix}")
        self.code = code
        self.message = message
        self.fix = fix


# Which extra provides which top-level module.
_EXTRAS = {
    "torch": "train",
    "transformers": "train",
    "peft": "train",
    "accelerate": "train",
    "onnxruntime": "onnx",
    "onnx": "onnx",
    "optimum": "onnx",
    "llama_cpp": "gguf",
    "gguf": "gguf",
}


def require(module: str) -> ModuleType:
    """Import an optional dependency, or fail with the extra that installs it."""
    try:
        return import_module(module)
    except ImportError as exc:
        extra = _EXTRAS.get(module.split(".")[0], "train")
        raise ModelError(
            ErrorCode.MISSING_EXTRA,
            f"{module} is not installed ({exc})",
            f"pip install 'deepfusion-edge[{extra}]'",
        ) from None
