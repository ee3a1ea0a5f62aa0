"""Fixtures of the trainer tests: public and held-out text from the default split, a tiny tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepfusion.shared.corpora import SplitManifest, read_jsonl


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
