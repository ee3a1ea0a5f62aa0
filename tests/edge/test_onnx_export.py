"""The ONNX export's choices: the MatMuls int8 leaves in float32, weights beside a graph past 2 GB."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deepfusion.edge.backends import load_backend


def test_a_graph_past_the_protobuf_limit_is_saved_with_external_weights(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tiny_llama: Path,
    onnx_exports: dict[str, Path],
    held_out_windows: list[np.ndarray],
) -> None:
    import deepfusion.edge.export.onnx as onnx_export

    # Lowering the limit takes the path a 1B-parameter fp32 export takes, on the tiny model.
    monkeypatch.setattr(onnx_export, "_PROTO_LIMIT", 0)
    out = onnx_export.export_onnx(tiny_llama, tmp_path / "big", quant="fp32", keep_forward=True).parent
    for name in ("model.onnx", "forward.onnx"):
        assert (out / f"{name}.data").stat().st_size > 10 * (out / name).stat().st_size
    windows = held_out_windows[:4]
    with load_backend("onnxruntime", out, threads=1) as backend:
        external = backend.score(windows, top_k=8, stages=2, patches=2)
    with load_backend("onnxruntime", onnx_exports["fp32"], threads=1) as backend:
        inline = backend.score(windows, top_k=8, stages=2, patches=2)
    for a, b in zip(external, inline, strict=True):
        assert np.array_equal(a.topk_ids, b.topk_ids)
        assert np.allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-5)
        assert a.features is not None and b.features is not None
        assert np.allclose(a.features, b.features, atol=1e-4)
    # Exported again below the limit into the same folder, the stale weights file goes.
    monkeypatch.setattr(onnx_export, "_PROTO_LIMIT", 2**31 - 2**24)
    onnx_export.export_onnx(tiny_llama, out, quant="fp32")
    assert not (out / "model.onnx.data").exists()


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2", "tiny-gpt2"])
def test_int8_keeps_every_mlp_down_projection_in_float32(
    family: str,
    tmp_path: Path,
    tiny_llama: Path,
    random_models: dict[str, Path],
    onnx_exports: dict[str, Path],
) -> None:
    """One per block, found by name in each family's graph; the model's other MatMuls are int8."""
    import onnx

    from deepfusion.edge.export.onnx import export_onnx
    from deepfusion.edge.modelinfo import shape_from_hf_config

    source = tiny_llama if family == "tiny-llama" else random_models[family]
    if family == "tiny-llama":
        exported = onnx_exports["int8"]
    else:
        exported = export_onnx(source, tmp_path / "int8").parent
    layers = shape_from_hf_config(json.loads((source / "config.json").read_text())).num_layers
    graph = onnx.load(str(exported / "model.onnx"), load_external_data=False).graph
    model_nodes = [n for n in graph.node if not n.name.startswith("deepfusion_head/")]
    float_matmuls = [n.name for n in model_nodes if n.op_type in ("MatMul", "Gemm")]
    down = [name for name in float_matmuls if "/mlp/down_proj/" in name or "/mlp/c_proj/" in name]
    assert len(down) == layers, float_matmuls
    # The attention and up projections of every block, and the LM head, are int8.
    assert sum(n.op_type == "MatMulInteger" for n in model_nodes) >= 3 * layers


@pytest.mark.slow
def test_smollm2_int8_export_stays_close_to_float32(
    tmp_path: Path, asset_cache: Path, held_out_texts: list[str]
) -> None:
    """The real model's outlier activations: quantizing its down projections too cost +0.66 nats."""
    from deepfusion.cloud.zoo.smollm2 import smollm2_dir
    from deepfusion.edge.export.onnx import export_onnx
    from deepfusion.edge.modelinfo import load_tokenizer
    from deepfusion.edge.scoring import windows
    from tests.edge.agreement import agreement

    model = smollm2_dir(asset_cache)
    tokenizer = load_tokenizer(model)
    ids = [w.token_ids for w in windows(tokenizer, held_out_texts, 128)][:12]
    with load_backend("torch", model, threads=2) as backend:
        reference = backend.score(ids, top_k=8)
    exported = export_onnx(model, tmp_path / "int8").parent
    with load_backend("onnxruntime", exported, threads=2) as backend:
        scores = backend.score(ids, top_k=32)
    measured = agreement(reference, scores, 8)
    mean_gap = float(np.mean([got.nll - ref.nll for ref, got in zip(reference, scores, strict=True)]))
    print(f"SmolLM2-135M onnx-int8 vs torch fp32: {measured}, mean NLL gap {mean_gap:+.3f}")
    assert measured.top1 >= 0.75 and mean_gap <= 0.15, (measured, mean_gap)


def test_an_export_without_forward_drops_an_earlier_forward_graph(
    tmp_path: Path, tiny_llama: Path, onnx_exports: dict[str, Path]
) -> None:
    """`forward.onnx` left from an earlier export would be another model's graph under this one."""
    import shutil

    from deepfusion.edge.export.onnx import export_onnx

    out = shutil.copytree(onnx_exports["fp32"], tmp_path / "again")
    assert (out / "forward.onnx").is_file()
    export_onnx(tiny_llama, out, quant="int8")
    assert not (out / "forward.onnx").exists() and not (out / "forward.onnx.data").exists()
    assert (out / "model.onnx").is_file()
