"""Hostile knowledge: one of four devices of a cluster sends valid but poisoned packets.

The same round is trained three times from the same base: clean, poisoned without the screening and
poisoned with it. The poisoned packets come out of the real edge scorer through the simulator's
`PoisonedBackend`, so they are exactly what a hostile device would publish.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoTokenizer  # noqa: E402

from deepfusion.cloud.cluster import ClusterReport  # noqa: E402
from deepfusion.cloud.data import index_round, read_clusters  # noqa: E402
from deepfusion.cloud.evaluate import token_windows  # noqa: E402
from deepfusion.cloud.merge import MergeSpec  # noqa: E402
from deepfusion.cloud.robust import (  # noqa: E402
    nll_lower_bound,
    screen_round,
    screening_values,
    sequence_divergence,
)
from deepfusion.cloud.sim.attack import Poison, PoisonedBackend, poison_score  # noqa: E402
from deepfusion.cloud.students import StudentSpec  # noqa: E402
from deepfusion.cloud.trainer import TrainSpec, train_round  # noqa: E402
from deepfusion.cloud.vaa import VAAConfig  # noqa: E402
from deepfusion.edge.backends import SequenceScore  # noqa: E402
from deepfusion.shared.packets import SequenceKnowledge  # noqa: E402
from deepfusion.shared.store import open_store  # noqa: E402
from tests.cloud.tiny import FED, ROUND, put_sequences, random_device_model, score_into_round, tiny_student  # noqa: E402

DEVICES = {"dev-0": "tiny-llama", "dev-1": "tiny-gpt2", "dev-2": "tiny-llama", "dev-3": "tiny-gpt2"}
HOSTILE = "dev-3"


def _knowledge(ids: np.ndarray, logprobs: np.ndarray, tokens: np.ndarray, nll: float) -> SequenceKnowledge:
    n = len(tokens)
    return SequenceKnowledge(0, tokens, np.zeros((n, 2), np.uint32), ids, logprobs, nll)


def test_poisoned_scores_stay_valid_and_move_mass_onto_the_target() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 50))
    logprobs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    order = np.argsort(-logprobs, axis=1)[:, :4]
    honest = SequenceScore(order, np.take_along_axis(logprobs, order, 1).astype(np.float32), 3.0, None, ())
    target = int(order[0, 1])  # in the first row's top-k, outside most others
    poisoned = poison_score(honest, Poison(target, mass=0.7, nll_scale=0.5))
    probs = np.exp(poisoned.topk_logprobs)
    assert (poisoned.topk_ids[:, 0] == target).all()  # 0.7 is the largest entry of every row
    assert (probs.sum(1) <= 1 + 1e-6).all() and (np.diff(poisoned.topk_logprobs, axis=1) <= 0).all()
    assert all(len(set(row)) == len(row) for row in poisoned.topk_ids.tolist())
    assert poisoned.nll == pytest.approx(1.5)


def test_divergence_and_nll_bound_against_direct_computation() -> None:
    tokens = np.array([5, 7, 9])
    a_probs = np.array([[0.5, 0.3], [0.6, 0.2], [0.5, 0.5]])
    b_probs = np.array([[0.6, 0.2], [0.5, 0.1], [0.5, 0.5]])
    a = _knowledge(np.array([[7, 1], [9, 2], [3, 4]]), np.log(a_probs), tokens, 1.0)
    b = _knowledge(np.array([[1, 8], [2, 9], [3, 4]]), np.log(b_probs), tokens, 1.0)
    # Position 0: a = {7: .5, 1: .3, tail .2}, b = {1: .6, 8: .2, tail .2} on the support (7, 1, 8, tail).
    p = np.array([[0.5, 0.3, 0.0, 0.2], [0.6, 0.2, 0.0, 0.2], [0.5, 0.5, 0.0, 0.0]])  # a: 9, 2, _, tail
    q = np.array([[0.0, 0.6, 0.2, 0.2], [0.1, 0.5, 0.0, 0.4], [0.5, 0.5, 0.0, 0.0]])

    def js(x: np.ndarray, y: np.ndarray) -> float:
        m = (x + y) / 2
        kl = lambda u, v: sum(ui * np.log(ui / vi) for ui, vi in zip(u, v, strict=True) if ui > 0)  # noqa: E731
        return 0.5 * kl(x, m) + 0.5 * kl(y, m)

    expected = np.mean([js(p[i], q[i]) for i in range(3)])
    assert sequence_divergence(a, b) == pytest.approx(expected, rel=1e-6)
    assert sequence_divergence(a, a) == pytest.approx(0.0, abs=1e-9)
    # Next tokens 7 and 9: both in a's top-k (0.5 and 0.6); for b, 7 is in the tail (0.2) and 9 has 0.1.
    assert nll_lower_bound(a) == pytest.approx(-(np.log(0.5) + np.log(0.6)) / 2)
    assert nll_lower_bound(b) == pytest.approx(-(np.log(0.2) + np.log(0.1)) / 2)


@pytest.fixture(scope="module")
def rounds(
    tmp_path_factory: pytest.TempPathFactory, texts: dict[str, list[str]], tokenizer_dir: Path
) -> dict[str, str]:
    """Two local stores of one round of 4 devices in one cluster: all honest, and dev-3 hostile."""
    from deepfusion.edge.backends import load_backend

    root = tmp_path_factory.mktemp("poison")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    target = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" the"))[0]
    clusters = ClusterReport(
        k=1,
        assignment=dict.fromkeys(DEVICES, 0),
        members={0: sorted(DEVICES)},
        sizes={0: len(DEVICES)},
        silhouette=None,
        centroids=[[1.0, 0.0]],
    )
    models = {
        device: random_device_model(preset, len(tokenizer), i, root / device)
        for i, (device, preset) in enumerate(DEVICES.items())
    }
    stores = {}
    for variant in ("clean", "poisoned"):
        store = open_store(str(root / variant))
        for device, model_dir in models.items():
            with load_backend("torch", model_dir, threads=1) as backend:
                scorer = backend
                if variant == "poisoned" and device == HOSTILE:
                    scorer = PoisonedBackend(backend, Poison(target, mass=0.8, nll_scale=0.5))
                work = root / f"packets-{variant}-{device}"
                score_into_round(store, device, scorer, tokenizer, texts["public"], work)
        store.put(f"{FED}/rounds/{ROUND}/clusters.json", clusters.model_dump_json().encode())
        stores[variant] = str(root / variant)
    return stores


def test_screening_quarantines_only_the_hostile_device(rounds: dict[str, str]) -> None:
    for variant, expected in (("clean", {}), ("poisoned", {HOSTILE})):
        store = open_store(rounds[variant])
        index = index_round(store, FED, ROUND, read_clusters(store, FED, ROUND))
        screening = screen_round(store, index)
        assert set(screening.quarantined) == set(expected), (variant, screening)
    assert screening.devices[HOSTILE].relative > 3
    assert all(s.relative < 2 for d, s in screening.devices.items() if d != HOSTILE)


def test_the_screening_removes_most_of_the_damage(
    rounds: dict[str, str], tokenizer_dir: Path, texts: dict[str, list[str]]
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    heldout = {"medical": token_windows(tokenizer, texts["heldout"], max_tokens=96)}
    spec = TrainSpec(
        student=StudentSpec(steps=30, batch_size=4, lr=3e-3, alpha=0.1, vaa=VAAConfig(width=32)),
        merge=MergeSpec(split=1),
        tune_steps=4,
        tune_batch_size=4,
        tune_beta=1.0,
    )
    nll = {}
    for name, variant, screen in (
        ("clean", "clean", True),
        ("undefended", "poisoned", False),
        ("defended", "poisoned", True),
    ):
        note, report = train_round(
            open_store(rounds[variant]),
            FED,
            ROUND,
            tiny_student(len(tokenizer)),
            tokenizer,
            TrainSpec(**{**spec.__dict__, "screen": screen, "version": name}),
            heldout=heldout,
        )
        nll[name] = note.metrics["medical.nll"]
        assert set(report["quarantined"]) == ({HOSTILE} if name == "defended" else set())
    damage = nll["undefended"] - nll["clean"]
    assert damage > 0.3, nll
    assert nll["defended"] - nll["clean"] < 0.25 * damage, nll


def test_a_device_claiming_an_impossible_nll_is_quarantined(rounds: dict[str, str], tmp_path: Path) -> None:
    """Honest distributions, but a reported seq_nll far below what they allow (to win the weighting)."""
    from dataclasses import replace

    from deepfusion.shared.packets import decode, encode

    clean = open_store(rounds["clean"])
    liar = open_store(str(tmp_path / "liar"))
    for key in clean.list(f"{FED}/"):
        data = clean.get(key)
        if f"/knowledge/{HOSTILE}/" in key:
            packet = decode(data)
            data = encode(replace(packet, seq_nll=packet.seq_nll * 0.01))
        liar.put(key, data)
    index = index_round(liar, FED, ROUND, read_clusters(liar, FED, ROUND))
    screening = screen_round(liar, index)
    assert set(screening.quarantined) == {HOSTILE}
    assert "below what its own distributions allow" in screening.quarantined[HOSTILE]
    assert screening.devices[HOSTILE].relative < 2  # its distributions agree: only the claim gives it away


_VOCAB = 50


def _flat_sequences(seed: int, ids: range, n: int = 6) -> list[SequenceKnowledge]:
    """Sequences `ids` of n tokens whose top-4 rows are random ids of equal probability (seeded)."""
    rng = np.random.default_rng(seed)
    return [
        SequenceKnowledge(
            i,
            np.arange(n),
            np.zeros((n, 2)),
            np.stack([rng.permutation(_VOCAB)[:4] for _ in range(n)]),
            np.full((n, 4), -1.7),
            3.0,
        )
        for i in ids
    ]


def _one_cluster(devices: str) -> ClusterReport:
    """Every device (one letter each) in cluster 0."""
    return ClusterReport(
        k=1,
        assignment=dict.fromkeys(devices, 0),
        members={0: list(devices)},
        sizes={0: len(devices)},
        silhouette=None,
        centroids=[[1.0]],
    )


def test_two_members_with_identical_packets_do_not_crash_the_screening(tmp_path: Path) -> None:
    """Devices running one unmodified model agree exactly (divergence 0): the others' median is 0."""
    store = open_store(str(tmp_path / "store"))
    for device, seed in (("a", 0), ("b", 0), ("c", 1)):
        put_sequences(store, device, _flat_sequences(seed, range(10)), _VOCAB)
    screening = screen_round(store, index_round(store, FED, ROUND, _one_cluster("abc")))
    assert screening.devices["a"].disagreement == 0 and screening.devices["a"].reason is None
    assert set(screening.quarantined) == {"c"}  # disagrees, above the floor, where the others agree exactly
    assert "inf" not in screening.quarantined["c"]


def test_a_member_without_partners_has_no_ratio_next_to_members_that_agree_exactly(tmp_path: Path) -> None:
    """A device that shares too few sequences with anybody is undecidable: its `relative` is no number,
    not 1.0 (the ratio of members that agree), whatever the others' median."""
    store = open_store(str(tmp_path / "store"))
    for device, ids in (("a", range(10)), ("b", range(10)), ("c", range(10)), ("d", range(20, 23))):
        put_sequences(store, device, _flat_sequences(0, ids), _VOCAB)
    screening = screen_round(store, index_round(store, FED, ROUND, _one_cluster("abcd")))
    assert screening.devices["a"].relative == 1.0
    assert screening.devices["d"].partners == 0 and np.isnan(screening.devices["d"].relative)
    assert "d.relative" not in screening_values(screening) and not screening.quarantined
