"""Phase III merge: exactness of the split, averaging, a stock checkpoint; Qwen2-MoE and DeepSeek-V3."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    DeepseekV3ForCausalLM,
    Qwen2ForCausalLM,
    Qwen2MoeForCausalLM,
)
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE  # noqa: E402

from deepfusion.cloud.merge import MergeSpec, merge_students_into_moe, routed_scale  # noqa: E402
from deepfusion.cloud.zoo.presets import get_preset  # noqa: E402

torch.set_num_threads(1)
VOCAB = 256


def _student(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = get_preset("student-tiny").config(VOCAB, num_hidden_layers=2, layer_types=["full_attention"] * 2)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("split", [1, 4])
def test_one_student_split_into_g_experts_reproduces_its_logits(split: int) -> None:
    """top_k = G, norm_topk_prob False, uniform router: weights 1/G, each part scaled by G."""
    student = _student(0)
    spec = MergeSpec(split=split, top_k=split, norm_topk_prob=False, shared_expert=False, router_init_std=0.0)
    moe = merge_students_into_moe([student], spec)
    assert moe.config.num_experts == split and routed_scale(moe.config, spec) == split
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, student(ids).logits, atol=1e-5, rtol=1e-5)


def test_merge_of_two_students_routes_and_averages_the_trunk() -> None:
    a, b = _student(0), _student(1)
    moe = merge_students_into_moe([a, b], MergeSpec(split=2))
    assert moe.config.num_experts == 4 and moe.config.num_experts_per_tok == 2
    layer = moe.model.layers[1]
    want = (a.model.layers[1].self_attn.q_proj.weight + b.model.layers[1].self_attn.q_proj.weight) / 2
    torch.testing.assert_close(layer.self_attn.q_proj.weight, want)
    # Expert 2 = student b's first half of gate rows.
    torch.testing.assert_close(
        layer.mlp.experts[2].gate_proj.weight, b.model.layers[1].mlp.gate_proj.weight[:256]
    )
    mean_up = (a.model.layers[1].mlp.up_proj.weight + b.model.layers[1].mlp.up_proj.weight) / 2
    torch.testing.assert_close(layer.mlp.shared_expert.up_proj.weight, mean_up)
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()  # still tied
    out = moe(torch.randint(0, VOCAB, (2, 9)), output_router_logits=True)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.aux_loss)


def test_two_identical_students_with_shared_expert_reproduce_the_student() -> None:
    """(1 - λ)·FFN + λ·mean FFN = FFN when both students are the same model."""
    student = _student(2)
    spec = MergeSpec(split=2, top_k=2, norm_topk_prob=True, shared_expert=True, router_init_std=0.0)
    moe = merge_students_into_moe([student, student], spec)
    ids = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, student(ids).logits, atol=1e-5, rtol=1e-5)


def test_bad_split_is_refused() -> None:
    with pytest.raises(ValueError, match="must divide"):
        merge_students_into_moe([_student(0)], MergeSpec(split=3))


def test_qwen2_moe_refuses_a_head_width_it_cannot_hold_and_deepseek_takes_it() -> None:
    """Qwen2-MoE's attention needs head_dim × heads = hidden_size; a Qwen2 student need not have it."""
    config = get_preset("student-tiny").config(VOCAB, num_hidden_layers=2, layer_types=["full_attention"] * 2)
    config.head_dim = 32  # hidden_size 192 / 4 heads would be 48
    torch.manual_seed(0)
    student = Qwen2ForCausalLM(config).eval()
    with pytest.raises(ValueError, match="head_dim"):
        merge_students_into_moe([student], MergeSpec(split=2))
    moe = merge_students_into_moe([student], _deepseek(2))
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, student(ids).logits, atol=1e-5, rtol=1e-5)


def test_sliding_window_attention_is_kept_or_refused() -> None:
    """Qwen2-MoE (eager and SDPA) slides every layer's window or none: a student sliding in all its
    layers merges exactly, one sliding in some layers only (max_window_layers) is refused; the merge
    used to drop the window silently and give full attention."""
    sliding = ["sliding_attention"] * 2
    config = get_preset("student-tiny").config(VOCAB, num_hidden_layers=2, layer_types=sliding)
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 4, 0
    torch.manual_seed(0)
    student = Qwen2ForCausalLM(config).eval()
    spec = MergeSpec(split=2, top_k=2, shared_expert=False, router_init_std=0.0)
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            merge_students_into_moe([student], spec)(ids).logits, student(ids).logits, atol=1e-5, rtol=1e-5
        )
    student.config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="sliding"):
        merge_students_into_moe([student], spec)


@pytest.mark.parametrize("shared", [True, False])
def test_release_loads_with_plain_transformers_and_generates(tmp_path: Path, shared: bool) -> None:
    moe = merge_students_into_moe([_student(0), _student(1)], MergeSpec(split=2, shared_expert=shared))
    moe.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, Qwen2MoeForCausalLM)
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, moe(ids).logits)
    out = loaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12)


def test_release_decodes_with_the_students_generation_settings(tmp_path: Path) -> None:
    """An instruct base ends a turn at several ids and samples by default (its generation_config.json):
    the release must too, not fall back to a fresh config's single eos id and greedy decoding."""
    students = [_student(0), _student(1)]
    for student in students:
        student.generation_config = transformers.GenerationConfig(
            eos_token_id=[3, 5], do_sample=True, temperature=0.7, top_p=0.8, repetition_penalty=1.1
        )
    merge_students_into_moe(students, MergeSpec(split=2)).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).generation_config
    assert loaded.eos_token_id == [3, 5] and loaded.do_sample
    assert (loaded.temperature, loaded.top_p, loaded.repetition_penalty) == (0.7, 0.8, 1.1)


# DeepSeek-V3 target --------------------------------------------------------------------------------


def _sharp_student(seed: int) -> Qwen2ForCausalLM:
    """A student whose biases, norm weights and peaked attention all matter (the init zeroes biases)."""
    student = _student(seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, param in student.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                param.copy_(0.5 * noise)
            elif "q_proj" in name or "k_proj" in name:
                param.copy_(noise * 2 / param.shape[1] ** 0.5)
    return student


def _deepseek(split: int, **overrides: object) -> MergeSpec:
    fields: dict[str, object] = {
        "split": split,
        "top_k": split,
        "shared_expert": False,
        "router_init_std": 0.0,
        "architecture": "deepseek_v3",
    }
    fields.update(overrides)
    return MergeSpec(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("split", "norm", "shared"), [(2, False, False), (4, True, False), (4, False, True)])
def test_deepseek_moe_block_reproduces_the_student_ffn(split: int, norm: bool, shared: bool) -> None:
    """All G experts active, sigmoid(0) = 1/2 (or 1/G renormalised) undone by routed_scaling_factor."""
    student = _sharp_student(0)
    moe = merge_students_into_moe([student], _deepseek(split, norm_topk_prob=norm, shared_expert=shared))
    assert isinstance(moe, DeepseekV3ForCausalLM) and moe.config.first_k_dense_replace == 0
    assert moe.config.n_routed_experts == split and routed_scale(moe.config, _deepseek(split)) == 1.0
    hidden = torch.randn(3, 17, student.config.hidden_size, generator=torch.Generator().manual_seed(5))
    for layer in range(student.config.num_hidden_layers):
        block = moe.model.layers[layer].mlp
        assert isinstance(block, DeepseekV3MoE)
        with torch.no_grad():
            torch.testing.assert_close(
                block(hidden), student.model.layers[layer].mlp(hidden), atol=1e-5, rtol=1e-5
            )


@pytest.mark.parametrize("split", [2, 4])
def test_deepseek_merge_of_one_student_reproduces_its_logits(split: int) -> None:
    """MLA holds the Qwen2 attention (biases, GQA, rotary) exactly; see merge._mla_layer."""
    student = _sharp_student(0)
    moe = merge_students_into_moe([student], _deepseek(split, shared_expert=True))
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids).logits, student(ids).logits, atol=1e-5, rtol=1e-5)


def test_deepseek_rotary_layout_matters() -> None:
    """The exactness above is not vacuous: DeepSeek's interleaved rotary breaks it."""
    student = _sharp_student(1)
    moe = merge_students_into_moe([student], _deepseek(2))
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    moe.config.rope_interleave = True
    with torch.no_grad():
        assert (moe(ids).logits - student(ids).logits).abs().max() > 1e-2


def test_deepseek_needs_two_experts() -> None:
    with pytest.raises(ValueError, match="at least 2 routed experts"):
        merge_students_into_moe([_student(0)], MergeSpec(split=1, architecture="deepseek_v3"))


def test_deepseek_release_of_two_students_loads_with_plain_transformers_and_generates(tmp_path: Path) -> None:
    moe = merge_students_into_moe(
        [_sharp_student(0), _sharp_student(1)], MergeSpec(split=2, architecture="deepseek_v3")
    )
    assert moe.config.n_routed_experts == 4 and moe.config.num_experts_per_tok == 2
    assert moe.config.n_shared_experts == 2 and moe.config.routed_scaling_factor == 1.0  # (1 - ½) / ½
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()  # still tied
    moe.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, DeepseekV3ForCausalLM)
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, moe(ids).logits)
    out = loaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12)


def _imbalance(moe: torch.nn.Module, ids: torch.Tensor) -> float:
    """Coefficient of variation of the tokens each expert gets, over every layer's router."""
    from deepfusion.cloud.balance import BiasBalancer

    balancer = BiasBalancer(moe, rate=0.0)
    with torch.no_grad():
        moe(ids)
    loads = torch.stack(balancer.step())  # rate 0: counts only
    balancer.close()
    return float((loads.std(dim=1) / loads.mean(dim=1)).mean())


def test_aux_loss_free_bias_update_evens_the_deepseek_expert_load() -> None:
    from deepfusion.cloud.trainer import TrainSpec, tune_moe

    students = [_sharp_student(0), _sharp_student(1)]
    spec = MergeSpec(split=4, top_k=2, architecture="deepseek_v3", router_init_std=0.5)
    windows = [np.random.default_rng(i).integers(0, VOCAB, 48) for i in range(64)]
    probe = torch.from_numpy(np.stack(windows[:16]))
    tuned = {}
    for rate in (0.0, 0.01):
        moe = merge_students_into_moe(students, spec, seed=0)
        before = _imbalance(moe, probe)
        tune_moe(moe, windows, TrainSpec(tune_steps=30, tune_lr=1e-6, tune_batch_size=8, bias_update=rate))
        tuned[rate] = _imbalance(moe, probe)
        biases = [m.e_score_correction_bias for m in moe.modules() if hasattr(m, "e_score_correction_bias")]
        assert all(bool(b.abs().sum() > 0) == (rate > 0) for b in biases)
    # A near-zero learning rate leaves the router weights alone: what evens the load is the bias.
    assert tuned[0.01] < 0.65 * tuned[0.0] and tuned[0.0] == pytest.approx(before, rel=0.1), (before, tuned)


def test_bias_update_needs_a_deepseek_moe() -> None:
    from deepfusion.cloud.balance import BiasBalancer

    with pytest.raises(ValueError, match="deepseek_v3"):
        BiasBalancer(merge_students_into_moe([_student(0), _student(1)], MergeSpec(split=1)), rate=0.01)


@pytest.mark.parametrize(
    "change",
    [{"num_attention_heads": 2, "num_key_value_heads": 1}, {"rope_theta": 500.0}, {"hidden_act": "gelu"}],
)
def test_students_of_one_tensor_shape_but_another_architecture_are_refused(change: dict[str, object]) -> None:
    """Same tensor shapes, other meaning: averaging them under student 0's config is silently wrong."""
    torch.manual_seed(1)
    config = get_preset("student-tiny").config(VOCAB, num_hidden_layers=2, layer_types=["full_attention"] * 2)
    for name, value in change.items():
        setattr(config, name, value)
    other = Qwen2ForCausalLM(config).eval()
    with pytest.raises(ValueError, match="students must share one architecture"):
        merge_students_into_moe([_student(0), other], MergeSpec(split=1))
