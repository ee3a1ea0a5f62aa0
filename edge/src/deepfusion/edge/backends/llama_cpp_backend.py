"""The llama.cpp backend: a GGUF file (f16, q8_0, q4_k_m, ...) with `tokenizer.json` beside it.

Through llama-cpp-python's low-level API: each sequence is decoded in chunks of `n_batch` tokens
with logits for every position and the output embeddings (the last hidden state after the final
norm) switched on. llama.cpp exposes no intermediate hidden states, so this backend gives features
for the last stage only (hidden-state index L); `capabilities` says so and the packets list just that
stage in `feature_stages`.

Top-k and log-softmax run in numpy (`deepfusion.edge.topk`, row blocks on `threads` threads) on
llama.cpp's own logits buffer (no copy); the exponentials go to a reused buffer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from deepfusion.edge.backends import Backend, Capabilities, ModelShape, SequenceScore, finite_scores
from deepfusion.edge.errors import ErrorCode, ModelError, require
from deepfusion.edge.features import pooling_matrix, stage_layers
from deepfusion.edge.modelinfo import gguf_file, read_gguf
from deepfusion.edge.topk import topk_log_softmax

__all__ = ["DEFAULT_CONTEXT", "LlamaCppBackend", "open_backend"]

# llama.cpp allocates the KV cache for the whole context up front: at a model's training context
# (131,072 tokens for Llama-3.2-1B) that is 4 GB, for windows of a few hundred tokens.
DEFAULT_CONTEXT = 4096


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
        n_ctx = min(context or DEFAULT_CONTEXT, shape.context)
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
        self._pool = ThreadPoolExecutor(threads or os.cpu_count(), thread_name_prefix="topk")

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None
        self._pool.shutdown()

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
                top = topk_log_softmax(logits, top_k, self._scratch, parallel=self._pool.map)
                topk_ids[start : start + m] = top.ids
                topk_logprobs[start : start + m] = top.logprobs
                targets = ids[start + 1 : start + m + 1]
                rows = np.arange(len(targets))
                total += float((logits[rows, targets] - top.lse[rows]).sum())
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
        return finite_scores(results)
