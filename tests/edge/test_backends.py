"""Every backend and quantization against torch float32, on held-out text with the pretrained tiny-llama.

Thresholds are set from measurements (docs/edge-models.md has the numbers): the exact formats (ONNX
fp32, GGUF f16) agree almost perfectly; int8 and the llama.cpp quantizations lose a little.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deepfusion.edge.backends import SequenceScore, load_backend
from deepfusion.edge.features import pool_stages, stage_layers
from tests.edge.agreement import agreement
from tests.edge.conftest import TOP_K

pytestmark = pytest.mark.slow

# backend/quantization -> (min top-1 agreement, max mean KL over the top-8 set + tail, max NLL gap).
# Measured on 1,870 held-out tokens (16 windows of <= 128): onnx-fp32 1.000 / 4.5e-13 / 1.4e-6,
# onnx-int8 0.985 / 1.8e-5 / 2.2e-3, gguf-f16 0.9995 / 1.2e-8 / 6.7e-5, gguf-q8_0 0.991 / 6.0e-6 / 9.9e-4,
# gguf-q4_k_m 0.980 / 2.5e-5 / 2.5e-3. Thresholds leave about 4x (KL: 10-100x) headroom.
THRESHOLDS = {
    "onnx-fp32": (0.999, 1e-8, 1e-4),
    "onnx-int8": (0.95, 1e-3, 0.02),
    "gguf-f16": (0.995, 1e-6, 1e-3),
    "gguf-q8_0": (0.98, 1e-4, 0.01),
    "gguf-q4_k_m": (0.95, 5e-4, 0.02),
}
STAGES, PATCHES = 4, 4


@pytest.fixture(scope="module")
def torch_scores(tiny_llama: Path, held_out_windows: list[np.ndarray]) -> list[SequenceScore]:
    with load_backend("torch", tiny_llama, threads=1) as backend:
        return backend.score(held_out_windows, top_k=TOP_K, stages=STAGES, patches=PATCHES)


def _candidate(name: str, path: Path, windows: list[np.ndarray]) -> list[SequenceScore]:
    with load_backend(name, path, threads=1) as backend:
        return backend.score(windows, top_k=4 * TOP_K, stages=STAGES, patches=PATCHES)


@pytest.mark.parametrize("quant", ["fp32", "int8"])
def test_onnx_agrees_with_torch(
    quant: str,
    onnx_exports: dict[str, Path],
    torch_scores: list[SequenceScore],
    held_out_windows: list[np.ndarray],
) -> None:
    scores = _candidate("onnxruntime", onnx_exports[quant], held_out_windows)
    measured = agreement(torch_scores, scores, TOP_K)
    print(f"onnx-{quant}: {measured}")
    top1, kl, gap = THRESHOLDS[f"onnx-{quant}"]
    assert measured.top1 >= top1 and measured.kl <= kl and measured.nll_gap <= gap, measured


@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m"])
def test_gguf_agrees_with_torch(
    quant: str,
    gguf_exports: dict[str, Path],
    torch_scores: list[SequenceScore],
    held_out_windows: list[np.ndarray],
) -> None:
    scores = _candidate("llama_cpp", gguf_exports[quant], held_out_windows)
    measured = agreement(torch_scores, scores, TOP_K)
    print(f"gguf-{quant}: {measured}")
    top1, kl, gap = THRESHOLDS[f"gguf-{quant}"]
    assert measured.top1 >= top1 and measured.kl <= kl and measured.nll_gap <= gap, measured
    # llama.cpp exposes only the last hidden state: one stage of features, the last, close to torch's.
    assert all(s.feature_stages == (STAGES - 1,) for s in scores)
    if quant == "f16":
        for ref, got in zip(torch_scores, scores, strict=True):
            assert got.features is not None and ref.features is not None
            np.testing.assert_allclose(got.features[0], ref.features[-1], atol=0.02, rtol=0.02)


def test_onnx_features_match_torch(
    onnx_exports: dict[str, Path], torch_scores: list[SequenceScore], held_out_windows: list[np.ndarray]
) -> None:
    scores = _candidate("onnxruntime", onnx_exports["fp32"], held_out_windows)
    for ref, got in zip(torch_scores, scores, strict=True):
        assert got.feature_stages == ref.feature_stages == (0, 1, 2, 3)
        np.testing.assert_allclose(got.features, ref.features, atol=1e-4, rtol=1e-4)
    int8 = _candidate("onnxruntime", onnx_exports["int8"], held_out_windows)
    for ref, got in zip(torch_scores, int8, strict=True):
        scale = np.abs(ref.features).max()
        assert np.abs(got.features - ref.features).max() <= 0.1 * scale


def test_torch_pooling_matches_numpy(tiny_llama: Path, held_out_windows: list[np.ndarray]) -> None:
    """The backend's pooled features equal a direct numpy pooling of transformers' hidden states."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    windows = [held_out_windows[0][:37], held_out_windows[1][:5], held_out_windows[2]]  # ragged, n < P too
    with load_backend("torch", tiny_llama, threads=1) as backend:
        scores = backend.score(windows, top_k=4, stages=3, patches=PATCHES)
        layers = stage_layers(backend.shape.num_layers, 3)
    for ids, score in zip(windows, scores, strict=True):
        with torch.inference_mode():
            hidden = model(torch.from_numpy(ids)[None], output_hidden_states=True).hidden_states
        stacked = np.stack([hidden[i][0].numpy() for i in layers])  # (J, n, W)
        np.testing.assert_allclose(score.features, pool_stages(stacked, PATCHES), atol=1e-5, rtol=1e-5)


def test_torch_topk_and_nll_match_transformers_logits(
    tiny_llama: Path, held_out_windows: list[np.ndarray]
) -> None:
    """The torch backend's top-k, log-probs and NLL equal a float64 log-softmax of the model's logits,
    on a ragged batch (the padding rows must not leak into the short sequences)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    windows = [held_out_windows[0][:37], held_out_windows[1]]
    with load_backend("torch", tiny_llama, threads=1) as backend:
        scores = backend.score(windows, top_k=TOP_K)
    for ids, score in zip(windows, scores, strict=True):
        with torch.inference_mode():
            logits = model(torch.from_numpy(ids)[None]).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1).numpy()
        exact = np.argsort(-logprobs, axis=1, kind="stable")[:, :TOP_K]
        np.testing.assert_array_equal(score.topk_ids, exact)
        np.testing.assert_allclose(score.topk_logprobs, np.take_along_axis(logprobs, exact, 1), atol=1e-4)
        nll = -logprobs[np.arange(len(ids) - 1), ids[1:]].mean()
        assert score.nll == pytest.approx(nll, abs=1e-4)


def test_torch_nll_ignores_the_padding_of_a_ragged_batch(
    tiny_llama: Path, held_out_windows: list[np.ndarray]
) -> None:
    """A model that masks a token with a -inf logit (here id 0, the padding id) scores a short sequence
    in a ragged batch as it does alone: the padding's targets never enter its NLL (ONNX slices them off,
    llama.cpp never pads)."""
    import torch
    from transformers import AutoModelForCausalLM

    from deepfusion.edge.backends.torch_backend import TorchBackend

    class MasksTokenZero(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, **inputs: torch.Tensor) -> object:
            out = self.inner(**inputs)
            out.logits[..., 0] = float("-inf")
            return out

    model = MasksTokenZero(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
    backend = TorchBackend(tiny_llama, threads=1, model=model)
    short, long = held_out_windows[1][:9], held_out_windows[0]
    [alone] = backend.score([short], top_k=TOP_K)
    [_, batched] = backend.score([long, short], top_k=TOP_K)
    assert np.isfinite(alone.nll) and batched.nll == pytest.approx(alone.nll, abs=1e-5)


def test_topk_rows_are_a_log_softmax(
    torch_scores: list[SequenceScore], held_out_windows: list[np.ndarray]
) -> None:
    for ids, score in zip(held_out_windows, torch_scores, strict=True):
        assert score.topk_ids.shape == (len(ids), TOP_K)
        assert np.all(np.diff(score.topk_logprobs, axis=1) <= 0)  # descending
        assert np.all(np.exp(score.topk_logprobs).sum(axis=1) <= 1 + 1e-5)
        assert 0 < score.nll < 10


@pytest.mark.parametrize("family", ["tiny-qwen2", "tiny-gpt2"])
def test_other_families_export_exactly(
    family: str, random_models: dict[str, Path], tmp_path: Path, held_out_texts: list[str]
) -> None:
    """Qwen2 and GPT-2: GGUF f16 (and ONNX fp32 for GPT-2) match torch, and llama.cpp tokenizes like
    the tokenizer (the ByteLevel BPE is converted with GPT-2's pre-tokenizer)."""
    pytest.importorskip("llama_cpp")
    from deepfusion.edge.export.gguf import export_gguf
    from deepfusion.edge.modelinfo import load_tokenizer

    model = random_models[family]
    tokenizer = load_tokenizer(model)
    windows = [
        np.asarray(e.ids[:64]) for e in tokenizer.encode_batch(held_out_texts[:3], add_special_tokens=False)
    ]
    with load_backend("torch", model, threads=1) as backend:
        reference = backend.score(windows, top_k=TOP_K)
    gguf = export_gguf(model, tmp_path / "gguf", quant="f16")
    with load_backend("llama_cpp", gguf, threads=1) as backend:
        measured = agreement(reference, backend.score(windows, top_k=4 * TOP_K), TOP_K)
        for text in held_out_texts[:3]:
            ours = tokenizer.encode(text, add_special_tokens=False).ids
            assert backend.llm.tokenize(text.encode(), add_bos=False, special=False) == ours
    assert measured.nll_gap < 0.01, measured
    if family == "tiny-gpt2":
        pytest.importorskip("onnxruntime")
        from deepfusion.edge.export.onnx import export_onnx

        onnx_dir = export_onnx(model, tmp_path / "onnx", quant="fp32").parent
        with load_backend("onnxruntime", onnx_dir, threads=1) as backend:
            measured = agreement(reference, backend.score(windows, top_k=4 * TOP_K), TOP_K)
        assert measured.top1 == 1.0 and measured.nll_gap < 1e-4, measured


@pytest.mark.parametrize("kind", ["torch", "onnxruntime"])
def test_close_releases_the_model(kind: str, tiny_llama: Path, onnx_exports: dict[str, Path]) -> None:
    """A closed backend that is still referenced (an agent keeps its own) holds no runtime any more."""
    import gc
    import weakref

    path = tiny_llama if kind == "torch" else onnx_exports["fp32"]
    backend = load_backend(kind, path, threads=1)
    runtime = weakref.ref(backend.model if kind == "torch" else backend.session)  # type: ignore[attr-defined]
    backend.score([np.arange(1, 9)], top_k=2)
    backend.close()
    gc.collect()
    assert runtime() is None


def test_llama_cpp_sizes_its_context_by_the_windows_not_the_models_limit(
    federation_tokenizer_dir: Path, tmp_path: Path
) -> None:
    """llama.cpp allocates the KV cache for the whole context when it loads: at the 131,072 tokens of
    Llama-3.2-1B that is 4 GB. A model of 8,192 positions loads with 4,096 unless asked for more, and
    `score` asks for its window length."""
    pytest.importorskip("llama_cpp")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepfusion.cloud.zoo.presets import get_preset
    from deepfusion.edge.backends.llama_cpp_backend import DEFAULT_CONTEXT
    from deepfusion.edge.export.gguf import export_gguf

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(federation_tokenizer_dir)
    config = get_preset("tiny-llama").config(len(tokenizer), max_position_embeddings=8192)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "long")
    tokenizer.save_pretrained(tmp_path / "long")
    gguf = export_gguf(tmp_path / "long", tmp_path / "gguf", quant="f16")
    ids = np.arange(1, 65)
    with load_backend("llama_cpp", gguf, threads=1) as default:
        assert default.shape.context == DEFAULT_CONTEXT < 8192
        assert default.llm.n_ctx() == DEFAULT_CONTEXT  # type: ignore[attr-defined]
        expected = default.score([ids], top_k=8)[0]
    with load_backend("llama_cpp", gguf, threads=1, context=64) as small:
        assert small.shape.context == 64
        assert small.llm.n_ctx() <= 256  # type: ignore[attr-defined]  # llama.cpp pads to 256
        got = small.score([ids], top_k=8)[0]
    np.testing.assert_array_equal(got.topk_ids, expected.topk_ids)
    np.testing.assert_allclose(got.topk_logprobs, expected.topk_logprobs, atol=1e-5)
    with load_backend("llama_cpp", gguf, threads=1, context=100_000) as large:
        assert large.shape.context == 8192  # never beyond the model's own limit
