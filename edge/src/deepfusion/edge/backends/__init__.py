"""Scoring backends: one small interface, one module per runtime.

    backend = load_backend("onnxruntime", "exports/model-onnx", threads=2)
    scores = backend.score([ids_a, ids_b], top_k=32, stages=4, patches=4)

A backend takes token id sequences and returns, per sequence, the top-k next-token ids and
log-probs (log-softmax over the whole vocabulary in float32, computed where the logits are made),
the mean next-token NLL and the pooled stage features of `deepfusion.edge.features`. Backends that
cannot see intermediate hidden states (llama.cpp) say so in `capabilities` and return features for
the stages they can see; the packet then lists those stages in `feature_stages`. A model with fewer
layers than J stages still returns all J (some repeat a neighbour); the packet keeps only the stages
that end a layer group of their own (`Capabilities.feature_stages`).

| name | module | model path | needs |
|---|---|---|---|
| `torch` | `torch_backend` | HF checkpoint directory | `deepfusion-edge[train]` |
| `onnxruntime` | `onnxruntime_backend` | `export --format onnx` directory | `deepfusion-edge[onnx]` |
| `llama_cpp` | `llama_cpp_backend` | `.gguf` file (tokenizer.json beside it) | `deepfusion-edge[gguf]` |
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import import_module
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from deepfusion.edge.errors import ErrorCode, ModelError
from deepfusion.edge.features import filled_stages, stage_layers

__all__ = [
    "BACKENDS",
    "Backend",
    "Capabilities",
    "ModelShape",
    "SequenceScore",
    "available_backends",
    "finite_scores",
    "load_backend",
    "pad_batch",
]

# name -> (module, the import that must succeed)
BACKENDS: dict[str, tuple[str, str]] = {
    "torch": ("deepfusion.edge.backends.torch_backend", "torch"),
    "onnxruntime": ("deepfusion.edge.backends.onnxruntime_backend", "onnxruntime"),
    "llama_cpp": ("deepfusion.edge.backends.llama_cpp_backend", "llama_cpp"),
}


@dataclass(frozen=True)
class ModelShape:
    """What the scorer needs to know about a model, whatever its file format."""

    architecture: str  # transformers model_type, or the GGUF's general.architecture
    num_layers: int
    hidden_size: int
    vocab_size: int  # width of the logits (may exceed the tokenizer's vocabulary: padding rows)
    context: int  # longest sequence the loaded model scores: the model's limit, or less (llama.cpp)


@dataclass(frozen=True)
class Capabilities:
    """What a loaded backend can give. `hidden_states`: the hidden-state indices (0..L) it can pool."""

    name: str
    hidden_states: tuple[int, ...]
    quantization: str  # "fp32", "int8", "f16", "q8_0", ...

    def feature_stages(self, num_layers: int, stages: int) -> tuple[int, ...]:
        """Which of J stages this backend can give features for (stage j ends at stage_layers()[j]).

        Only stages that end a layer group of their own: with more stages than layers, the others
        would repeat a neighbour's features (or pool the token embeddings).
        """
        if stages == 0:
            return ()
        visible = set(self.hidden_states)
        layers = stage_layers(num_layers, stages)
        return tuple(j for j in filled_stages(num_layers, stages) if layers[j] in visible)


@dataclass(frozen=True, eq=False)
class SequenceScore:
    """What a backend knows about one sequence of n tokens."""

    topk_ids: np.ndarray  # [n, k] int64; row t is the distribution of token t + 1
    topk_logprobs: np.ndarray  # [n, k] float32, descending
    nll: float  # mean -log p(token t+1 | tokens <= t) over t < n - 1 (0 for n = 1)
    features: np.ndarray | None  # [Js, P, W] float32 for the stages in `feature_stages`
    feature_stages: tuple[int, ...]


class Backend(ABC):
    """A loaded model that scores token id sequences."""

    name: str
    shape: ModelShape
    capabilities: Capabilities

    @abstractmethod
    def score(
        self, sequences: Sequence[np.ndarray], *, top_k: int, stages: int = 0, patches: int = 1
    ) -> list[SequenceScore]:
        """Score each sequence (1-D integer ids); J = `stages` (0: no features), P = `patches`."""

    @abstractmethod
    def forward(self, sequences: Sequence[np.ndarray]) -> None:
        """A plain forward pass computing all-position logits: the throughput reference."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release the runtime's memory (the object is unusable afterwards)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_sequences(self, sequences: Sequence[np.ndarray], top_k: int) -> list[np.ndarray]:
        """Common input checks: non-empty 1-D ids below the vocabulary size, within the context; k within
        the vocabulary."""
        if not 1 <= top_k <= self.shape.vocab_size:
            raise ModelError(
                ErrorCode.BAD_INPUT,
                f"top_k={top_k} outside 1..{self.shape.vocab_size}",
                "choose a smaller k",
            )
        checked = []
        for ids in sequences:
            ids = np.asarray(ids, dtype=np.int64)
            if ids.ndim != 1 or len(ids) == 0:
                raise ModelError(ErrorCode.BAD_INPUT, "a sequence is empty or not 1-D", "pass 1-D id arrays")
            if len(ids) > self.shape.context:  # learned positions (GPT-2) have no row for the rest
                raise ModelError(
                    ErrorCode.BAD_INPUT,
                    f"a sequence of {len(ids)} tokens exceeds the context of {self.shape.context}",
                    "score shorter windows (--max-tokens)",
                )
            if int(ids.min()) < 0 or int(ids.max()) >= self.shape.vocab_size:
                raise ModelError(
                    ErrorCode.VOCAB_MISMATCH,
                    f"token id {int(ids.max())} is outside the model's vocabulary of {self.shape.vocab_size}",
                    "tokenize with the model's own tokenizer (its tokenizer.json)",
                )
            checked.append(ids)
        return checked


def finite_scores(scores: list[SequenceScore]) -> list[SequenceScore]:
    """`scores`, refused as a whole when a broken model gave NaN or infinities.

    Damaged or overflowing weights give NaN everywhere; left to the packet encoder, they would fail
    one sequence at a time with a packet error that names no model, and an agent would retry forever.
    A -inf log-prob (a logit the model masks) is a real value and passes.
    """
    for score in scores:
        features = score.features
        if (
            np.isnan(score.topk_logprobs).any()
            or not np.isfinite(score.nll)
            or (features is not None and not np.isfinite(features).all())
        ):
            raise ModelError(
                ErrorCode.CORRUPT_MODEL,
                "the model computes NaN or infinite log-probs, NLL or hidden states",
                "copy or export the model again; a float16 model that overflows needs float32",
            )
    return scores


def pad_batch(sequences: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded `input_ids` and `attention_mask`, both [B, T] int64, T the longest sequence."""
    width = max(len(s) for s in sequences)
    ids = np.zeros((len(sequences), width), dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for b, s in enumerate(sequences):
        ids[b, : len(s)] = s
        mask[b, : len(s)] = 1
    return ids, mask


def micro_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group sequence indices, longest first, so that (count x longest) stays within `batch_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def available_backends() -> list[str]:
    """Backends whose runtime is installed here (nothing is imported)."""
    return [name for name, (_, package) in BACKENDS.items() if find_spec(package) is not None]


def load_backend(name: str, model_path: str | Path, **options: Any) -> Backend:
    """Load `model_path` with backend `name`; `options` (threads, batch_tokens, ...) go to the backend."""
    if name not in BACKENDS:
        raise ModelError(
            ErrorCode.BAD_INPUT, f"unknown backend {name!r}", f"choose one of {', '.join(BACKENDS)}"
        )
    module_name, package = BACKENDS[name]
    if find_spec(package) is None:
        extra = {"torch": "train", "onnxruntime": "onnx", "llama_cpp": "gguf"}[name]
        raise ModelError(
            ErrorCode.MISSING_EXTRA,
            f"the {name} backend needs {package}, which is not installed",
            f"pip install 'deepfusion-edge[{extra}]'",
        )
    path = Path(model_path)
    if not path.exists():
        raise ModelError(ErrorCode.BAD_INPUT, f"{path} does not exist", "check the model path")
    module = import_module(module_name)
    backend: Backend = module.open_backend(path, **options)
    return backend
