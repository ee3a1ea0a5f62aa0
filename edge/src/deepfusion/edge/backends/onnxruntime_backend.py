"""The ONNX Runtime backend: a directory written by `deepfusion-edge export --format onnx`.

The exported graph computes top-k, log-softmax, the target log-probs and the pooled hidden states
itself (see `deepfusion.edge.export.onnx`); only [B, T, k] rows and [B, L + 1, P, W] features leave
the session. Needs onnxruntime and numpy only: no torch, no transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepfusion.edge.backends import (
    Backend,
    Capabilities,
    ModelShape,
    SequenceScore,
    finite_scores,
    micro_batches,
    pad_batch,
)
from deepfusion.edge.errors import ErrorCode, ModelError, require
from deepfusion.edge.features import pooling_matrix, stage_layers
from deepfusion.edge.modelinfo import read_export_manifest

__all__ = ["OnnxBackend", "open_backend"]


def open_backend(path: Path, **options: Any) -> OnnxBackend:
    return OnnxBackend(path, **options)


def _session(path: Path, threads: int | None) -> Any:
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(
            ErrorCode.CORRUPT_MODEL,
            f"onnxruntime cannot load {path} ({type(exc).__name__}: {exc})",
            "export the model again with `deepfusion-edge export --format onnx`",
        ) from None


class OnnxBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self, path: Path, *, threads: int | None = None, batch_tokens: int = 2048, graph: str = "model.onnx"
    ) -> None:
        if path.is_file():
            path = path.parent
        manifest = read_export_manifest(path)
        self.shape = ModelShape(**manifest["shape"])
        self.capabilities = Capabilities(
            name=self.name,
            hidden_states=tuple(range(int(manifest["hidden_states"]))),
            quantization=str(manifest["quantization"]),
        )
        self.path = path
        self.threads = threads
        self.batch_tokens = batch_tokens
        self.session = _session(path / graph, threads)
        self._inputs = {i.name for i in self.session.get_inputs()}
        self._forward_session: Any = None

    def close(self) -> None:
        # The sessions hold the weights and ONNX Runtime's memory arenas for as long as they are
        # referenced, and a closed backend may stay referenced (an agent keeps its own).
        self.session = None
        self._forward_session = None

    def _feeds(self, sequences: Sequence[np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        ids, mask = pad_batch(sequences)
        width = ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in self._inputs:
            feeds["position_ids"] = np.broadcast_to(np.arange(width, dtype=np.int64), ids.shape).copy()
        return feeds, width

    def forward(self, sequences: Sequence[np.ndarray]) -> None:
        """Needs `forward.onnx` (written by `export_onnx(..., keep_forward=True)`)."""
        if self._forward_session is None:
            self._forward_session = _session(self.path / "forward.onnx", self.threads)
        sequences = [np.asarray(s, dtype=np.int64) for s in sequences]
        for batch in micro_batches([len(s) for s in sequences], self.batch_tokens):
            feeds, _ = self._feeds([sequences[i] for i in batch])
            self._forward_session.run(["logits"], feeds)

    def score(
        self, sequences: Sequence[np.ndarray], *, top_k: int, stages: int = 0, patches: int = 1
    ) -> list[SequenceScore]:
        sequences = self.check_sequences(sequences, top_k)
        layers = list(stage_layers(self.shape.num_layers, stages)) if stages else []
        results: list[SequenceScore | None] = [None] * len(sequences)
        for batch in micro_batches([len(s) for s in sequences], self.batch_tokens):
            chunk = [sequences[i] for i in batch]
            feeds, width = self._feeds(chunk)
            lengths = [len(s) for s in chunk]
            next_ids = np.zeros_like(feeds["input_ids"])
            next_ids[:, :-1] = feeds["input_ids"][:, 1:]
            feeds["next_ids"] = next_ids
            feeds["top_k"] = np.array([top_k], dtype=np.int64)
            feeds["pooling"] = pooling_matrix(lengths, patches if layers else 1, width)
            wanted = ["topk_logprobs", "topk_ids", "target_logprob"] + (["pooled_hidden"] if layers else [])
            out = self.session.run(wanted, feeds)
            logprobs, ids, target = out[0], out[1], out[2]
            features = out[3][:, layers] if layers else None  # (B, J, P, W)
            for b, (i, n) in enumerate(zip(batch, lengths, strict=True)):
                results[i] = SequenceScore(
                    topk_ids=ids[b, :n],
                    topk_logprobs=logprobs[b, :n],
                    nll=float(-target[b, : n - 1].sum() / (n - 1)) if n > 1 else 0.0,
                    features=None if features is None else features[b],
                    feature_stages=tuple(range(len(layers))),
                )
        return finite_scores([r for r in results if r is not None])
