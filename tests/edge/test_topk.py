"""The grouped numpy top-k / log-softmax is exact: same ids and log-probs as a full float64 sort."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from deepfusion.edge.topk import topk_log_softmax


def _exact(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    lse = np.log(np.exp(logits.astype(np.float64)).sum(axis=1))
    return ids, np.take_along_axis(logits, ids, 1) - lse[:, None], lse


@pytest.mark.parametrize("vocab", [100, 4096, 4096 + 37, 49152])
@pytest.mark.parametrize("k", [1, 16, 32])
def test_random_rows_match_a_full_sort(vocab: int, k: int) -> None:
    logits = (np.random.default_rng(vocab + k).standard_normal((40, vocab)) * 4).astype(np.float32)
    ids, logprobs, lse = _exact(logits, k)
    top = topk_log_softmax(logits, k)
    np.testing.assert_array_equal(top.ids, ids)
    np.testing.assert_allclose(top.logprobs, logprobs, atol=1e-5)
    np.testing.assert_allclose(top.lse, lse, atol=1e-5)


def test_row_blocks_on_a_thread_pool_give_the_same_rows() -> None:
    logits = (np.random.default_rng(5).standard_normal((150, 4096)) * 4).astype(np.float32)  # 3 blocks
    ids, logprobs, lse = _exact(logits, 16)
    with ThreadPoolExecutor(2) as pool:
        top = topk_log_softmax(logits, 16, parallel=pool.map)
    np.testing.assert_array_equal(top.ids, ids)
    np.testing.assert_allclose(top.logprobs, logprobs, atol=1e-5)
    np.testing.assert_allclose(top.lse, lse, atol=1e-5)


def test_a_top_k_crowded_into_few_groups_is_still_found() -> None:
    """Rows whose best logits all share one or two strided groups, the hard case for the pruning."""
    vocab, k = 4096, 32
    groups = vocab // 8
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((3, vocab)).astype(np.float32)
    logits[0, np.arange(8) * groups + 5] += 20  # one whole group on top
    logits[1, np.arange(8) * groups + 5] += 20
    logits[1, np.arange(8) * groups + 9] += 19
    logits[2, vocab - 40 :] += 30  # the top at the end of the row
    ids, logprobs, _ = _exact(logits, k)
    top = topk_log_softmax(logits, k)
    np.testing.assert_array_equal(top.ids, ids)
    np.testing.assert_allclose(top.logprobs, logprobs, atol=1e-5)


def test_the_logits_can_serve_as_their_own_scratch() -> None:
    logits = (np.random.default_rng(2).standard_normal((10, 4096)) * 4).astype(np.float32)
    ids, logprobs, _ = _exact(logits, 8)
    top = topk_log_softmax(logits, 8, scratch=logits)
    np.testing.assert_array_equal(top.ids, ids)
    np.testing.assert_allclose(top.logprobs, logprobs, atol=1e-5)
