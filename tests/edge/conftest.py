"""Models for the edge tests: the zoo's tiny presets on the federation tokenizer, built once per session.

Fidelity of quantized exports is tested on the base-pretrained tiny-llama (random-init models have
flat logits that hide quantization error); family coverage uses random-init tiny presets, where the
exact formats (ONNX fp32, GGUF f16) must still match torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from deepfusion.shared.corpora import SplitManifest, read_jsonl
from tests.fixtures.models import gguf_export

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

TOP_K = 8  # the set over which KL is measured
WINDOW = 128


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield


def random_preset(name: str, tokenizer_dir: Path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from deepfusion.cloud.zoo.presets import get_preset
    from deepfusion.cloud.zoo.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(get_preset(name).config(len(tokenizer)))
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="session")
def random_models(
    tmp_path_factory: pytest.TempPathFactory, federation_tokenizer_dir: Path
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("random-models")
    return {
        name: random_preset(name, federation_tokenizer_dir, root / name)
        for name in ("tiny-llama", "tiny-qwen2", "tiny-gpt2")
    }


@pytest.fixture(scope="session")
def held_out_texts(default_split: tuple[Path, SplitManifest]) -> list[str]:
    """Held-out medical abstracts: no device and no public set holds them."""
    split_dir, split = default_split
    documents = read_jsonl(split_dir / split.test["medical"].file)
    return [d.text for _, d in zip(range(12), documents, strict=False)]


@pytest.fixture(scope="session")
def held_out_windows(tiny_llama: Path, held_out_texts: list[str]) -> list[np.ndarray]:
    from deepfusion.edge.modelinfo import load_tokenizer
    from deepfusion.edge.scoring import windows

    tokenizer = load_tokenizer(tiny_llama)
    return [w.token_ids for w in windows(tokenizer, held_out_texts, WINDOW)][:16]


@pytest.fixture(scope="session")
def onnx_exports(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> dict[str, Path]:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("optimum.exporters.onnx")
    from deepfusion.edge.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("onnx")
    return {
        quant: export_onnx(tiny_llama, root / quant, quant=quant, keep_forward=True).parent  # type: ignore[arg-type]
        for quant in ("fp32", "int8")
    }


@pytest.fixture(scope="session")
def gguf_exports(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, gguf_q8_0: Path
) -> dict[str, Path]:
    return {
        "f16": gguf_export(tmp_path_factory, tiny_llama, "f16"),
        "q8_0": gguf_q8_0,
        "q4_k_m": gguf_export(tmp_path_factory, tiny_llama, "q4_k_m"),
    }
