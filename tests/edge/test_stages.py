"""A round's J may exceed a small model's layers: features go out for the stages that end a layer group."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from deepfusion.edge.backends import Capabilities
from deepfusion.edge.cli import app
from deepfusion.edge.features import filled_stages
from deepfusion.shared.packets import decode


def test_stages_beyond_the_layers_keep_those_that_end_a_group() -> None:
    assert filled_stages(3, 4) == (1, 2, 3)  # stage 0 would end at the embeddings
    assert filled_stages(2, 4) == (1, 3)  # stages 0 and 2 would repeat the embeddings and block 1
    assert filled_stages(6, 4) == (0, 1, 2, 3)
    assert Capabilities("torch", tuple(range(4)), "fp32").feature_stages(3, 4) == (1, 2, 3)
    assert Capabilities("torch", tuple(range(7)), "fp32").feature_stages(6, 4) == (0, 1, 2, 3)
    assert Capabilities("llama_cpp", (3,), "q8_0").feature_stages(3, 4) == (3,)  # the last hidden state


def test_score_on_a_model_with_fewer_layers_than_stages(
    random_models: dict[str, Path], held_out_texts: list[str], tmp_path: Path
) -> None:
    """tiny-gpt2 has 3 layers; `score` asks for J = 4 by default."""
    from deepfusion.edge.backends import load_backend

    model = random_models["tiny-gpt2"]
    public = tmp_path / "public.jsonl"
    public.write_text("".join(json.dumps({"text": t}) + "\n" for t in held_out_texts[:2]))
    out = tmp_path / "packets"
    args = ["score", str(model), "-i", str(public), "-o", str(out), "--top-k", "8", "--max-tokens", "64"]
    result = CliRunner().invoke(app, [*args, "--threads", "1", "--patches", "2"])
    assert result.exit_code == 0, result.output
    assert "feature stages [1, 2, 3]" in result.output
    packets = [decode(p.read_bytes()) for p in sorted(out.glob("*.dfk"))]
    assert packets and all(p.header.stages == 4 for p in packets)
    assert all(p.header.feature_stages == (1, 2, 3) and p.header.feature_width == 128 for p in packets)
    first = next(packets[0].sequences())
    assert first.features is not None and first.features.shape == (3, 2, 128)

    # Stages 1..3 of J = 4 end at hidden states 1, 2 and 3: J = 3's stages 0..2 (scored here alone,
    # not in a padded batch, hence the tolerance).
    with load_backend("torch", model, threads=1) as backend:
        [three] = backend.score([first.token_ids.astype(np.int64)], top_k=8, stages=3, patches=2)
    assert three.features is not None
    np.testing.assert_allclose(first.features.astype(np.float32), three.features, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("stages", [4, 7])
def test_torch_backend_gives_every_stage_beyond_the_layers(
    random_models: dict[str, Path], stages: int
) -> None:
    from deepfusion.edge.backends import load_backend

    ids = np.arange(5, 25, dtype=np.int64)
    with load_backend("torch", random_models["tiny-gpt2"], threads=1) as backend:
        [score] = backend.score([ids], top_k=4, stages=stages, patches=2)
        [three] = backend.score([ids], top_k=4, stages=3, patches=2)
    assert score.features is not None and three.features is not None
    assert score.features.shape == (stages, 2, 128)
    picked = list(Capabilities("torch", tuple(range(4)), "fp32").feature_stages(3, stages))
    np.testing.assert_array_equal(score.features[picked], three.features)
