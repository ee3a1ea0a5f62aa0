"""The data embedding e_n: MiniLM mean embedding, fixed JL projection, int8, cached per corpus."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from deepfusion.edge import embed
from deepfusion.shared.messages import EMBEDDING_DIM, DeviceCard

MEDICAL = [
    "Patients with chronic kidney disease received the drug daily for twelve weeks.",
    "The randomized trial measured blood pressure and renal function in older adults.",
    "Adverse events were more frequent in the placebo group than among treated patients.",
]
FINANCE = [
    "Quarterly earnings beat forecasts and the board raised the dividend.",
    "Bond yields rose as investors expected the central bank to raise interest rates.",
    "Shares of the lender fell after it reported weaker lending margins.",
]


def _cosine(a: list[int], b: list[int]) -> float:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


def test_sentence_embeddings_match_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    ours = embed.sentence_embeddings(MEDICAL + FINANCE)
    model = st.SentenceTransformer(str(embed.model_dir()), device="cpu")
    theirs = model.encode(MEDICAL + FINANCE, normalize_embeddings=True)
    assert ours.shape == (6, 384)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    assert np.allclose(ours, theirs, atol=1e-4)


def test_data_embedding_is_32_int8_values_that_fit_a_card_and_separate_domains():
    medical = embed.data_embedding(MEDICAL)
    finance = embed.data_embedding(FINANCE)
    assert len(medical) == EMBEDDING_DIM and all(isinstance(v, int) and -127 <= v <= 127 for v in medical)
    assert max(abs(v) for v in medical) == 127  # scaled by max-abs
    more_medical = embed.data_embedding(
        [*MEDICAL[1:], "Clinicians recorded symptoms at each hospital visit."]
    )
    assert _cosine(medical, more_medical) > _cosine(medical, finance)
    card = DeviceCard(
        federation="fed", device="pi-1", model_family="llama", model_params=1, tokenizer="ab" * 32,
        vocab_size=10, backend="torch", stages=0, feature_width=0, embedding=medical,
    )  # fmt: skip
    assert card.embedding == medical


def test_projection_is_fixed_and_preserves_cosine():
    matrix = embed.projection_matrix()
    assert matrix.shape == (384, EMBEDDING_DIM) and not matrix.flags.writeable
    rng = np.random.default_rng(embed.PROJECTION_SEED)
    assert np.array_equal(matrix, rng.standard_normal((384, EMBEDDING_DIM)) / np.sqrt(EMBEDDING_DIM))
    vectors = embed.sentence_embeddings(MEDICAL + FINANCE)
    before = vectors @ vectors.T
    projected = vectors @ matrix
    projected /= np.linalg.norm(projected, axis=1, keepdims=True)
    after = projected @ projected.T
    assert np.abs(before - after).mean() < 0.2  # JL: distortion shrinks with the dimension
    assert embed.project_and_quantize(np.zeros(384)) == [0] * EMBEDDING_DIM


def test_cached_per_corpus_and_sampled_deterministically(tmp_path, monkeypatch):
    texts = [f"Document {i} about interest rates and loans." for i in range(12)]
    first = embed.data_embedding(texts, max_texts=4, seed=3, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("embedding-*.json"))) == 1
    embed._cache.clear()

    def fail(texts: object) -> None:
        raise AssertionError("the cached corpus was embedded again")

    monkeypatch.setattr(embed, "sentence_embeddings", fail)
    assert embed.data_embedding(texts, max_texts=4, seed=3, cache_dir=tmp_path) == first
    with pytest.raises(ValueError):
        embed.data_embedding(["", "  "])


def _constant_embeddings(texts: list[str]) -> np.ndarray:
    return np.full((len(texts), embed.MODEL_WIDTH), 1 / np.sqrt(embed.MODEL_WIDTH), dtype=np.float32)


def test_a_damaged_cache_is_embedded_again(tmp_path, monkeypatch):
    monkeypatch.setattr(embed, "sentence_embeddings", _constant_embeddings)
    texts = ["A private note about loans.", "Another one about rates."]
    first = embed.data_embedding(texts, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("embedding-*.json")
    cached.write_text("")  # a power loss after the rename, before its data reached the disk
    embed._cache.clear()
    assert embed.data_embedding(texts, cache_dir=tmp_path) == first
    assert json.loads(cached.read_text()) == first


def test_a_cache_that_cannot_be_written_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(embed, "sentence_embeddings", _constant_embeddings)

    def disk_full(path: Path, data: str, encoding: str | None = None) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    embed._cache.clear()
    assert len(embed.data_embedding(["A private note."], cache_dir=tmp_path)) == EMBEDDING_DIM
    assert not list(tmp_path.iterdir())
