"""The phase II losses against brute-force full-vocabulary computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deepfusion.cloud.losses import feature_mse, next_token_ce, teacher_weights, topk_tail_kl  # noqa: E402
from deepfusion.shared.packets import apply_top_p, sentinel_for  # noqa: E402

torch.set_num_threads(1)
V = 50


def _exact_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, t: float) -> torch.Tensor:
    p = torch.log_softmax(teacher_logits / t, -1)
    q = torch.log_softmax(student_logits / t, -1)
    return (p.exp() * (p - q)).sum(-1) * t**2


def _topk(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    lp = torch.log_softmax(teacher_logits, -1)
    values, ids = lp.topk(k, dim=-1)
    return ids, values


def _brute_bucket_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, k: int) -> torch.Tensor:
    """The k + 1 bucket KL at T = 1 by explicit loops over the vocabulary."""
    p = torch.softmax(teacher_logits.double(), -1)
    q = torch.softmax(student_logits.double(), -1)
    out = []
    for row in range(p.size(0)):
        top = set(p[row].topk(k).indices.tolist())
        kl = sum(p[row, i] * math.log(p[row, i] / q[row, i]) for i in top)
        pt = 1.0 - sum(p[row, i] for i in top)
        qt = 1.0 - sum(q[row, i] for i in top)
        if pt > 0:
            kl += pt * math.log(pt / qt)
        out.append(float(kl))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_topk_at_full_vocabulary_is_the_exact_kl(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(6, V, generator=g) * 2, torch.randn(6, V, generator=g) * 2
    ids, lp = _topk(teacher, V)
    got = topk_tail_kl(student, ids, lp, temperature=temperature)
    torch.testing.assert_close(got, _exact_kl(teacher, student, temperature), atol=1e-5, rtol=1e-5)


def test_topk_with_tail_matches_brute_force_buckets() -> None:
    g = torch.Generator().manual_seed(1)
    teacher, student = torch.randn(5, V, generator=g) * 3, torch.randn(5, V, generator=g)
    for k in (1, 4, 17):
        ids, lp = _topk(teacher, k)
        got = topk_tail_kl(student, ids, lp)
        torch.testing.assert_close(got.double(), _brute_bucket_kl(teacher, student, k), atol=1e-5, rtol=1e-5)
        assert torch.all(got <= _exact_kl(teacher, student, 1.0) + 1e-5)  # bucketing never adds KL


def test_identical_student_has_zero_kl_and_gradient_points_to_teacher() -> None:
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(4, V, generator=g)
    ids, lp = _topk(teacher, 8)
    assert topk_tail_kl(teacher.clone(), ids, lp).abs().max() < 1e-5
    student = torch.zeros(4, V, requires_grad=True)
    topk_tail_kl(student, ids, lp).sum().backward()
    assert torch.isfinite(student.grad).all()
    # Gradient descent raises the logits of the teacher's top id.
    top = ids[:, 0]
    assert torch.all(student.grad.gather(1, top[:, None]) < 0)


def test_sentinel_padding_is_ignored() -> None:
    """A top-p row padded with SENTINEL / -inf gives the loss of the shorter row, and finite gradients."""
    g = torch.Generator().manual_seed(3)
    teacher, student = torch.randn(8, V, generator=g) * 3, torch.randn(8, V, generator=g)
    ids, lp = _topk(teacher, 12)
    np_ids = ids.numpy().astype(np.uint16)
    p_ids, p_lp = apply_top_p(np_ids, lp.numpy().astype(np.float16), 0.6)
    sentinel = sentinel_for(np.dtype(np.uint16))
    assert (p_ids == sentinel).any()
    padded_ids = torch.from_numpy(p_ids.astype(np.int64))
    padded_lp = torch.from_numpy(p_lp.astype(np.float32))
    leaf = student.clone().requires_grad_(True)
    got = topk_tail_kl(leaf, padded_ids, padded_lp)
    got.sum().backward()
    assert torch.isfinite(leaf.grad).all()
    for row in range(8):
        n = int((p_ids[row] != sentinel).sum())
        want = topk_tail_kl(
            student[row : row + 1], padded_ids[row : row + 1, :n], padded_lp[row : row + 1, :n]
        )
        torch.testing.assert_close(got[row : row + 1], want)


def test_teacher_ids_beyond_the_students_vocabulary_join_the_tail() -> None:
    """A teacher with padded vocabulary rows may rank an id the student does not have. Its mass belongs
    to the tail bucket; clamped onto id V-1 it was compared with the student's V-1 once per such id."""
    g = torch.Generator().manual_seed(4)
    teacher, student = torch.randn(3, V + 10, generator=g) * 3, torch.randn(3, V, generator=g)
    teacher[:, V + 2] = teacher[:, V + 7] = 9.0  # two out-of-vocabulary ids at the top of every row
    ids, lp = _topk(teacher, 6)
    assert (ids >= V).sum(-1).eq(2).all()
    p = torch.softmax(teacher.double(), -1)
    q = torch.softmax(student.double(), -1)
    want = []
    for row in range(3):
        kept = [int(i) for i in ids[row] if i < V]
        kl = sum(p[row, i] * math.log(p[row, i] / q[row, i]) for i in kept)
        pt, qt = 1.0 - sum(p[row, i] for i in kept), 1.0 - sum(q[row, i] for i in kept)
        want.append(float(kl + pt * math.log(pt / qt)))
    got = topk_tail_kl(student, ids, lp)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-5)


def test_next_token_ce_matches_manual_and_respects_mask() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, V, generator=g)
    ids = torch.randint(0, V, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    lp = torch.log_softmax(logits, -1)
    terms = [-lp[b, t, ids[b, t + 1]] for b in range(2) for t in range(4) if mask[b, t] and mask[b, t + 1]]
    torch.testing.assert_close(next_token_ce(logits, ids, mask), torch.stack(terms).mean())
    torch.testing.assert_close(next_token_ce(logits, ids, mask, reduction="sum"), torch.stack(terms).sum())


def test_next_token_ce_of_a_batch_that_predicts_nothing_is_zero_and_keeps_its_graph() -> None:
    logits = torch.randn(2, 3, V, requires_grad=True)
    ids = torch.randint(0, V, (2, 3))
    mask = torch.tensor([[1, 0, 0], [1, 0, 0]])  # one real token per window: nothing to predict
    ce = next_token_ce(logits, ids, mask)
    assert float(ce) == 0.0
    ce.backward()
    assert logits.grad is not None and not logits.grad.any()


def test_feature_mse_weighting() -> None:
    pred = torch.zeros(2, 3, 4)
    target = torch.stack([torch.ones(3, 4), 3 * torch.ones(3, 4)])
    assert feature_mse(pred, target).item() == pytest.approx(5.0)
    assert feature_mse(pred, target, torch.tensor([1.0, 0.0])).item() == pytest.approx(1.0)


def test_teacher_weights_quality_and_equal() -> None:
    nan = float("nan")
    nll = torch.tensor(
        [
            [4.0, 4.5, 5.0],
            [4.0, 4.4, 5.2],
            [3.9, nan, 5.0],  # device 1 did not score this one
        ]
    )
    equal = teacher_weights(nll, tau=None)
    torch.testing.assert_close(equal[0], torch.full((3,), 1 / 3))
    torch.testing.assert_close(equal[2], torch.tensor([0.5, 0.0, 0.5]))
    w = teacher_weights(nll, tau=0.2)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    assert w[2, 1] == 0
    # Quality from the two shared sequences: Δnll = 0, 0.45, 1.1 -> exp(-Δ/0.2).
    raw = torch.exp(-torch.tensor([0.0, 0.45, 1.1]) / 0.2)
    torch.testing.assert_close(w[0], raw / raw.sum())
    assert w[0, 0] > w[0, 1] > w[0, 2]


def test_a_member_that_scored_nothing_does_not_change_the_others_weights() -> None:
    """A quarantined or silent member (all NaN) leaves the shared sequences the others' yardstick."""
    nan = float("nan")
    # Devices 0 and 1 are equal on the sequences both scored; device 0 also scored two harder ones.
    nll = torch.tensor([[1.0, 1.0], [1.0, 1.0], [3.0, nan], [3.0, nan]])
    silent = torch.cat([nll, torch.full((4, 1), nan)], dim=1)
    torch.testing.assert_close(teacher_weights(nll)[:2], torch.full((2, 2), 0.5))
    torch.testing.assert_close(teacher_weights(silent)[:2], torch.tensor([[0.5, 0.5, 0.0]] * 2))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_student_losses_of_a_batch_equal_the_per_row_full_vocabulary_computation(temperature: float) -> None:
    """The step's CE and KL share one log-softmax at T = 1; at any T they are the separate computations."""
    from transformers import Qwen2ForCausalLM

    from deepfusion.cloud.data import Batch, TeacherRow
    from deepfusion.cloud.students import StudentSpec, StudentTrainer
    from deepfusion.cloud.zoo.presets import get_preset

    torch.manual_seed(3)
    vocab, k = 64, 6
    config = get_preset("student-tiny").config(vocab, num_hidden_layers=1, layer_types=["full_attention"])
    student = Qwen2ForCausalLM(config)
    ids = torch.randint(0, vocab, (2, 9))
    lengths = torch.tensor([9, 5])
    mask = (torch.arange(9)[None] < lengths[:, None]).long()
    rows = []
    for seq, weight, kr in ((0, 0.7, k), (0, 0.3, k - 2), (1, 1.0, k)):
        n = int(lengths[seq])
        top = torch.stack([torch.randperm(vocab + 8)[:kr] for _ in range(n)])  # some beyond the student's
        lp = torch.log_softmax(torch.randn(n, vocab + 8), -1).gather(-1, top)
        lp[0, 1:] = -math.inf  # a row cut short by top-p
        rows.append(TeacherRow(seq, "d", weight, top, lp, None, (), 0))
    trainer = StudentTrainer(student, StudentSpec(temperature=temperature), stages=0, patches=1, widths=())
    logits = student(input_ids=ids, attention_mask=mask).logits
    losses = trainer.losses(Batch(ids, mask, lengths, rows))
    got = losses["kl"]
    expected = (
        sum(
            r.weight
            / len(r.topk_ids)
            * topk_tail_kl(
                logits[r.seq, : len(r.topk_ids)], r.topk_ids, r.topk_logprobs, temperature=temperature
            ).sum()
            for r in rows
        )
        / 2
    )
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    reference_ce = torch.nn.functional.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep])
    assert float(losses["ce"].detach()) == pytest.approx(float(reference_ce.detach()), rel=1e-6)
    got.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
