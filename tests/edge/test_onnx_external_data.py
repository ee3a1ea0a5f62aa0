"""An ONNX export too big for one protobuf file keeps its weights in `model.onnx.data` and scores the same."""

from __future__ import annotations

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
