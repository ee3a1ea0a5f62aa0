"""The material of a simulated federation, built from the cached corpora and model zoo.

Test windows are the first `test_windows` windows of each domain's held-out test file, so they are fixed
before any run and identical across runs and methods. Public windows are cut from the public split at
token boundaries, each at most `max_tokens` tokens, so one public text is one scored sequence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepfusion.cloud.sim.profile import SimProfile
from deepfusion.shared.corpora import SplitManifest, SplitSpec, prepare_corpora, prepare_splits, read_jsonl

__all__ = ["Assets", "prepare_assets"]

_SLACK = 4  # tokens left free per public window: re-tokenizing a cut text may merge differently at its ends


@dataclass(frozen=True)
class Assets:
    split_dir: Path
    split: SplitManifest
    tokenizer_dir: Path
    student_base: Path
    device_bases: dict[str, Path]  # preset -> base checkpoint
    public_texts: list[str]
    test_files: dict[str, Path]  # domain -> JSONL of exactly the test windows' texts
    private_files: dict[tuple[str, int], Path]  # (domain, share) -> JSONL

    def heldout(self, tokenizer: object, max_tokens: int) -> dict[str, list[np.ndarray]]:
        from deepfusion.cloud.evaluate import token_windows
        from deepfusion.cloud.shards import read_texts

        return {
            domain: token_windows(tokenizer, read_texts(path), max_tokens)
            for domain, path in self.test_files.items()
        }


def _cut(tokenizer: Any, texts: list[str], max_tokens: int) -> list[str]:
    """Texts cut at token boundaries into pieces of at most `max_tokens - _SLACK` tokens."""
    step = max_tokens - _SLACK
    pieces: list[str] = []
    for text, encoding in zip(
        texts, tokenizer(texts, return_offsets_mapping=True)["offset_mapping"], strict=True
    ):
        for start in range(0, len(encoding), step):
            span = encoding[start : start + step]
            piece = text[span[0][0] : span[-1][1]].strip()
            if len(span) > 8 and piece:
                pieces.append(piece)
    return pieces


def _windows_from(tokenizer: Any, path: Path, count: int, max_tokens: int) -> list[str]:
    pieces: list[str] = []
    batch: list[str] = []
    for document in read_jsonl(path):
        batch.append(document.text)
        if len(batch) == 64:
            pieces += _cut(tokenizer, batch, max_tokens)
            batch = []
            if len(pieces) >= count:
                return pieces[:count]
    return (pieces + _cut(tokenizer, batch, max_tokens))[:count] if batch else pieces[:count]


def prepare_assets(profile: SimProfile, devices_per_domain: int, cache_root: Path, work: Path) -> Assets:
    """Corpora, splits, tokenizer, base models, public and test windows (all but `work` cached)."""
    from deepfusion.cloud.zoo.presets import get_preset
    from deepfusion.cloud.zoo.pretrain import PretrainSpec, pretrain_base, token_stream
    from deepfusion.cloud.zoo.smollm2 import smollm2_dir
    from deepfusion.cloud.zoo.tokenizer import federation_tokenizer, load_tokenizer

    prepare_corpora(cache_root)
    split_dir, split = prepare_splits(cache_root, SplitSpec(devices_per_domain=devices_per_domain))
    public = [(split_dir / entry.file, entry) for entry in split.public.values()]
    student = get_preset(profile.student.preset)
    presets = {t.preset for t in profile.devices}
    on_smollm2 = student.tokenizer == "smollm2"
    tokenizer_dir = smollm2_dir(cache_root) if on_smollm2 else federation_tokenizer(public, cache_root)
    tokenizer = load_tokenizer(tokenizer_dir)

    ids: np.ndarray | None = None
    bases: dict[str, Path] = {}
    for name in sorted(presets | {student.name}):
        if name == "smollm2-135m":
            bases[name] = smollm2_dir(cache_root)
            continue
        if ids is None:  # the pretraining token stream is the cache key; built only when needed
            ids = token_stream(tokenizer, (d.text for path, _ in public for d in read_jsonl(path)))
        bases[name] = pretrain_base(
            get_preset(name),
            tokenizer_dir,
            ids,
            cache_root,
            PretrainSpec(steps=profile.student.pretrain_steps),
        )

    mix = profile.data.public_mix
    total = sum(mix.values())
    texts: list[str] = []
    for corpus, share in sorted(mix.items()):
        if corpus not in split.public:
            raise ValueError(f"public_mix names {corpus!r}; the public corpora are {sorted(split.public)}")
        count = round(profile.data.public_windows * share / total)
        texts += _windows_from(
            tokenizer, split_dir / split.public[corpus].file, count, profile.data.max_tokens
        )

    work.mkdir(parents=True, exist_ok=True)
    test_files: dict[str, Path] = {}
    for domain, entry in sorted(split.test.items()):
        pieces = _windows_from(
            tokenizer, split_dir / entry.file, profile.data.test_windows, profile.data.max_tokens
        )
        test_files[domain] = work / f"test-{domain}.jsonl"
        test_files[domain].write_text("".join(json.dumps({"text": p}) + "\n" for p in pieces))
    private = {
        (domain, share): split_dir / entry.file
        for domain, entries in split.devices.items()
        for share, entry in enumerate(entries)
    }
    return Assets(
        split_dir=split_dir,
        split=split,
        tokenizer_dir=tokenizer_dir,
        student_base=bases[student.name],
        device_bases={name: bases[name] for name in presets},
        public_texts=texts,
        test_files=test_files,
        private_files=private,
    )
