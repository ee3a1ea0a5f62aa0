"""The llama.cpp backend: a GGUF file (f16, q8_0, q4_k_m, ...) with `tokenizer.json` beside it.

Through llama-cpp-python's low-level API: each sequence is decoded in chunks of `n_batch` tokens
with logits for every position and the output embeddings (the last hidden state after the final
norm) switched on. llama.cpp exposes no intermediate hidden states, so this backend gives features
for the last stage only (hidden-state index L); `capabilities` says so and the packets list just that
stage in `feature_stages`.

Top-k and log-softmax run in numpy on llama.cpp's own logits buffer (no copy), with a blocked top-k:
the row's maximum per block of 64 logits, the k best blocks (which hold every top-k logit), then an
exact top-k among their 64 k candidates; the normaliser is one in-place exp over a reused buffer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepfusion.edge.backends import Backend, Capabilities, ModelShape, SequenceScore
from deepfusion.edge.errors import ErrorCode, ModelError, require
from deepfusion.edge.features import pooling_matrix, stage_layers
from deepfusion.edge.modelinfo import gguf_file, read_gguf

__all__ = ["LlamaCppBackend", "open_backend", "topk_log_softmax"]

_BLOCK = 64


def topk_log_softmax(
    logits: np.ndarray, k: int, scratch: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k ids [n, k] (descending) and their log-softmax [n, k] float32 of float32 `logits` [n, V]."""
    n, vocab = logits.shape
    blocks = vocab // _BLOCK
    if blocks <= k:  # small vocabulary: a plain partition is as fast
        candidates = np.broadcast_to(np.arange(vocab), (n, vocab))
    else:
        block_max = logits[:, : blocks * _BLOCK].reshape(n, blocks, _BLOCK).max(axis=2)  # (n, blocks)
        best = np.argpartition(block_max, blocks - k, axis=1)[:, blocks - k :]  # (n, k)
        candidates = (best[:, :, None] * _BLOCK + np.arange(_BLOCK)).reshape(n, k * _BLOCK)
        if vocab > blocks * _BLOCK:  # the ragged tail is always a candidate
            tail = np.broadcast_to(np.arange(blocks * _BLOCK, vocab), (n, vocab - blocks * _BLOCK))
            candidates = np.concatenate([candidates, tail], axis=1)
    values = np.take_along_axis(logits, candidates, axis=1)
    width = values.shape[1]
    top = np.argpartition(values, width - k, axis=1)[:, width - k :]
    top_values = np.take_along_axis(values, top, axis=1)
    order = np.argsort(-top_values, axis=1, kind="stable")
    ids = np.take_along_axis(np.take_along_axis(candidates, top, axis=1), order, axis=1)
    top_values = np.take_along_axis(top_values, order, axis=1)
    peak = top_values[:, :1]  # the row maximum
    buffer = scratch[:n] if scratch is not None and scratch.shape[1] == vocab else np.empty_like(logits)
    np.subtract(logits, peak, out=buffer)
    np.exp(buffer, out=buffer)
    lse = peak[:, 0] + np.log(buffer.sum(axis=1, dtype=np.float32))
    return ids.astype(np.int64), top_values - lse[:, None]


def open_backend(path: Path, **options: Any) -> LlamaCppBackend:
    return LlamaCppBackend(path, **options)


class LlamaCppBackend(Backend):
    name = "llama_cpp"

    def __init__(
        self,
        path: Path,
        *,
        threads: int | None = None,
        batch_tokens: int = 512,
        context: int | None = None,
        check_vocab: bool = True,
    ) -> None:
        llama_cpp = require("llama_cpp")
        self.llama_cpp = llama_cpp
        path = gguf_file(path)
        shape, tokens, quant = read_gguf(path)  # corrupt files fail here, with a clear error
        if check_vocab:
            from deepfusion.edge.export.gguf import gguf_vocab_check

            gguf_vocab_check(path, tokens)
        n_ctx = min(context or shape.context, shape.context)
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=batch_tokens,
                n_ubatch=batch_tokens,
                n_threads=threads or os.cpu_count(),
                n_threads_batch=threads or os.cpu_count(),
                logits_all=True,
                embedding=True,
                pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
                verbose=False,
            )
        except Exception as exc:
            raise ModelError(
                ErrorCode.CORRUPT_MODEL,
                f"llama.cpp cannot load {path} ({type(exc).__name__}: {exc})",
                "export it again with `deepfusion-edge export --format gguf`",
            ) from None
        self.shape = ModelShape(
            architecture=shape.architecture,
            num_layers=shape.num_layers,
            hidden_size=int(self.llm.n_embd()),
            vocab_size=int(self.llm.n_vocab()),
            context=n_ctx,
        )
        self.capabilities = Capabilities(
            name=self.name, hidden_states=(shape.num_layers,), quantization=quant
        )
        self.batch_tokens = batch_tokens
        self._scratch = np.empty((batch_tokens, self.shape.vocab_size), dtype=np.float32)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None

    def _decode(self, ids: np.ndarray) -> Any:
        """Decode one sequence chunk by chunk; yield (start, logits view [m, V], embeddings view [m, W])."""
        if len(ids) > self.shape.context:
            raise ModelError(
                ErrorCode.BAD_INPUT,
                f"a sequence of {len(ids)} tokens exceeds the context of {self.shape.context}",
                "score shorter windows (--max-tokens)",
            )
        llm, lib = self.llm, self.llama_cpp
        llm._ctx.kv_cache_clear()
        tokens = ids.tolist()
        for start in range(0, len(tokens), self.batch_tokens):
            chunk = tokens[start : start + self.batch_tokens]
            llm._batch.set_batch(batch=chunk, n_past=start, logits_all=True)
            llm._ctx.decode(llm._batch)
            m = len(chunk)
            logits = np.ctypeslib.as_array(
                lib.llama_get_logits(llm._ctx.ctx), shape=(m, self.shape.vocab_size)
            )
            embeddings = np.ctypeslib.as_array(
                lib.llama_get_embeddings(llm._ctx.ctx), shape=(m, self.shape.hidden_size)
            )
            yield start, logits, embeddings

    def forward(self, sequences: Sequence[np.ndarray]) -> None:
        for ids in sequences:
            for _ in self._decode(np.asarray(ids, dtype=np.int64)):
                pass

    def score(
        self, sequences: Sequence[np.ndarray], *, top_k: int, stages: int = 0, patches: int = 1
    ) -> list[SequenceScore]:
        sequences = self.check_sequences(sequences, top_k)
        last = stages and stage_layers(self.shape.num_layers, stages)[-1] == self.shape.num_layers
        results = []
        for ids in sequences:
            n = len(ids)
            topk_ids = np.empty((n, top_k), dtype=np.int64)
            topk_logprobs = np.empty((n, top_k), dtype=np.float32)
            total = 0.0
            pooled = np.zeros((patches, self.shape.hidden_size), dtype=np.float32) if last else None
            pool = pooling_matrix([n], patches)[0] if last else None  # (P, n)
            for start, logits, embeddings in self._decode(ids):
                m = len(logits)
                chunk_ids, chunk_logprobs = topk_log_softmax(logits, top_k, self._scratch)
                topk_ids[start : start + m] = chunk_ids
                topk_logprobs[start : start + m] = chunk_logprobs
                # log p(next token) = logit - logsumexp, where logsumexp = top-1 logit - top-1 log-prob
                targets = ids[start + 1 : start + m + 1]
                rows = np.arange(len(targets))
                lse = logits[rows, chunk_ids[rows, 0]] - chunk_logprobs[rows, 0]
                total += float((logits[rows, targets] - lse).sum())
                if pool is not None and pooled is not None:
                    pooled += pool[:, start : start + m] @ embeddings
            results.append(
                SequenceScore(
                    topk_ids=topk_ids,
                    topk_logprobs=topk_logprobs,
                    nll=-total / (n - 1) if n > 1 else 0.0,
                    features=None if pooled is None else pooled[None],
                    feature_stages=(stages - 1,) if last else (),
                )
            )
        return results
