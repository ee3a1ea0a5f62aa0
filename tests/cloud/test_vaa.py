"""View-Aligned Attention: pooling identical to the packets', shapes, and gradient into the student."""

from __future__ import annotations

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from transformers import Qwen2ForCausalLM  # noqa: E402

from deepfusion.cloud.losses import feature_mse, next_token_ce  # noqa: E402
from deepfusion.cloud.vaa import (  # noqa: E402
    VAAConfig,
    ViewAlignedAttention,
    backbone_grad_ratio,
    patch_pool,
    stage_indices,
)
from deepfusion.cloud.zoo.presets import get_preset  # noqa: E402
from deepfusion.edge.features import pooling_matrix, stage_layers  # noqa: E402

torch.set_num_threads(1)
log = logging.getLogger(__name__)


@pytest.mark.parametrize("patches", [1, 3, 4, 9])
def test_patch_pool_matches_the_packets_pooling(patches: int) -> None:
    lengths = [7, 12, 3]
    hidden = torch.randn(3, 12, 5)
    want = torch.from_numpy(pooling_matrix(lengths, patches, width=12)) @ hidden
    torch.testing.assert_close(patch_pool(hidden, torch.tensor(lengths), patches), want)
    assert stage_indices(6, 4) == stage_layers(6, 4)


def test_shapes_and_per_family_heads() -> None:
    config = VAAConfig(stages=2, patches=4, width=32, heads=4)
    vaa = ViewAlignedAttention(config, student_width=48, teacher_widths={"llama": 192, "gpt2": 128})
    states = [torch.randn(3, 10, 48) for _ in range(2)]
    lengths = torch.tensor([10, 6, 2])
    assert vaa(states, lengths, "llama").shape == (3, 2, 4, 192)
    assert vaa(states, lengths, "gpt2").shape == (3, 2, 4, 128)
    with pytest.raises(ValueError):
        vaa(states[:1], lengths, "llama")
    assert sum(p.numel() for p in vaa.parameters()) < 100_000  # small on purpose


def test_feature_loss_sends_gradient_into_the_student_backbone() -> None:
    torch.manual_seed(0)
    student = Qwen2ForCausalLM(get_preset("student-tiny").config(200, num_hidden_layers=4))
    config = VAAConfig(stages=2, patches=4, width=32)
    vaa = ViewAlignedAttention(config, student.config.hidden_size, {"llama": 192})
    ids = torch.randint(0, 200, (2, 16))
    mask = torch.ones_like(ids)
    out = student(ids, attention_mask=mask, output_hidden_states=True)
    stages = [out.hidden_states[i] for i in stage_indices(student.config.num_hidden_layers, config.stages)]
    target = torch.randn(2, 2, 4, 192)
    fm = feature_mse(vaa(stages, mask.sum(1), "llama"), target)
    ce = next_token_ce(out.logits, ids, mask)
    ratio = backbone_grad_ratio(student.model, fm, ce)
    log.info("backbone grad-norm ratio FM/CE = %.3f", ratio)
    assert np.isfinite(ratio) and ratio > 0
    fm.backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    # Stage 2 is the final-norm output, so the last layer's FFN gets gradient too.
    assert student.model.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0


def test_a_student_with_fewer_layers_than_stages_matches_each_teacher_stage_at_its_own_depth() -> None:
    """Round J = 4, student of 2 layers, a teacher packet carrying stages (1, 3): stage 3 (the teacher's
    last layer) is matched too, against the student's last hidden state, and stage 1 against its middle."""
    from deepfusion.cloud.data import Batch, TeacherRow, pad_windows
    from deepfusion.cloud.students import StudentSpec, StudentTrainer

    torch.manual_seed(0)
    student = Qwen2ForCausalLM(get_preset("student-tiny").config(64, num_hidden_layers=2))
    trainer = StudentTrainer(student, StudentSpec(alpha=1.0, beta=0.0), stages=4, patches=2, widths=[8])
    assert trainer.vaa is not None and trainer.vaa.config.stages == 4
    assert trainer.stage_ids == stage_indices(2, 4) == stage_layers(2, 4) == (0, 1, 1, 2)
    ids, mask, lengths = pad_windows([np.arange(10)])

    def fm(features: torch.Tensor) -> float:
        row = TeacherRow(
            seq=0,
            device="d",
            weight=1.0,
            topk_ids=torch.zeros(10, 1, dtype=torch.long),
            topk_logprobs=torch.zeros(10, 1),
            features=features,
            feature_stages=(1, 3),
            width=8,
        )
        with torch.no_grad():
            return float(trainer.losses(Batch(ids, mask, lengths, [row]))["fm"])

    last_moved = torch.zeros(2, 2, 8)
    last_moved[1] = 100.0
    assert fm(last_moved) > fm(torch.zeros(2, 2, 8)) + 1000  # the last stage is not dropped


def test_a_batch_without_teacher_features_trains_and_measures_no_feature_gradient() -> None:
    """A cluster may mix devices that pool features with devices whose backend exposes none; a batch
    scored only by the latter leaves L_FM a constant, which the gradient-ratio measurement must take
    as zero gradient, not fail on."""
    from deepfusion.cloud.data import Batch, TeacherRow, pad_windows
    from deepfusion.cloud.students import StudentSpec, StudentTrainer

    torch.manual_seed(0)
    student = Qwen2ForCausalLM(get_preset("student-tiny").config(64, num_hidden_layers=2))
    trainer = StudentTrainer(student, StudentSpec(alpha=0.1, steps=1), stages=2, patches=2, widths=[8])
    ids, mask, lengths = pad_windows([np.arange(10), np.arange(6)])
    rows = [
        TeacherRow(s, "d", 1.0, torch.zeros(n, 1, dtype=torch.long), torch.zeros(n, 1), None, (), 0)
        for s, n in enumerate((10, 6))
    ]
    losses = trainer.step(Batch(ids, mask, lengths, rows))  # step 1 measures the ratio
    assert losses["fm"] == 0.0 and losses["fm_ce_grad"] == 0.0
    assert np.isfinite(losses["loss"])
