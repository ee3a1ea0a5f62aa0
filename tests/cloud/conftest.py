"""Fixtures of the trainer tests: public and held-out text from the default split, a tiny tokenizer, and
a closed round scored by two random-init device models through the edge scorer."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepfusion.shared.corpora import SplitManifest, read_jsonl
from deepfusion.shared.store import open_store


def _take(path: Path, n: int) -> list:
    out = []
    for doc in read_jsonl(path):
        out.append(doc)
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def texts(default_split: tuple[Path, SplitManifest]) -> dict[str, list[str]]:
    split_dir, split = default_split
    public = [
        d.text[:400]
        for name in ("medical", "general")
        for d in _take(split_dir / split.public[name].file, 24)
    ]
    heldout = [d.text[:400] for d in _take(split_dir / split.test["medical"].file, 12)]
    return {"public": public, "heldout": heldout}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, texts: dict[str, list[str]]) -> Path:
    from deepfusion.cloud.zoo.tokenizer import END_OF_TEXT, train_byte_level_bpe

    tokenizer = train_byte_level_bpe(texts["public"], vocab_size=384)
    tokenizer.add_special_tokens({"eos_token": END_OF_TEXT, "pad_token": END_OF_TEXT})
    target = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def round_store(
    tmp_path_factory: pytest.TempPathFactory, texts: dict[str, list[str]], tokenizer_dir: Path
) -> str:
    """A local store holding one closed round: 2 device models' packets and 2 clusters."""
    from transformers import AutoTokenizer

    from deepfusion.cloud.cluster import ClusterReport
    from deepfusion.edge.backends import load_backend
    from tests.cloud.tiny import DEVICES, FED, ROUND, random_device_model, score_into_round

    root = tmp_path_factory.mktemp("round")
    store = open_store(str(root / "store"))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for i, (device, preset) in enumerate(DEVICES.items()):
        model_dir = random_device_model(preset, len(tokenizer), i, root / device)
        with load_backend("torch", model_dir, threads=1) as backend:
            score_into_round(store, device, backend, tokenizer, texts["public"], root / f"packets-{device}")
    clusters = ClusterReport(
        k=2,
        assignment={"dev-llama": 0, "dev-gpt2": 1},
        members={0: ["dev-llama"], 1: ["dev-gpt2"]},
        sizes={0: 1, 1: 1},
        silhouette=None,
        centroids=[[1.0, 0.0], [0.0, 1.0]],
    )
    store.put(f"{FED}/rounds/{ROUND}/clusters.json", clusters.model_dump_json().encode())
    return str(root / "store")
