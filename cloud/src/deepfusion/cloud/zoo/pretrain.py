"""Short base pretraining of a tiny preset on the public corpus, cached by content hash.

Real devices start from a pretrained checkpoint, not from noise; a few hundred steps on public news
and abstracts give the tiny presets that starting point (they learn spelling, frequent words and
syntax), so what a device's private fine-tuning adds is domain knowledge, as in the paper. The result
is cached under a key made of everything that determines it: the preset's config, the tokenizer's
fingerprint, the token stream's sha256 and the training spec.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from deepfusion.cloud.zoo.presets import ModelPreset
from deepfusion.cloud.zoo.tokenizer import fingerprint, load_tokenizer
from deepfusion.shared.corpora.cache import staged_directory

__all__ = [
    "PretrainResult",
    "PretrainSpec",
    "base_model_dir",
    "pretrain_base",
    "read_result",
    "token_stream",
]

PRETRAIN_VERSION = 1
_RESULT = "deepfusion-pretrain.json"


@dataclass(frozen=True)
class PretrainSpec:
    steps: int = 300  # 0.6M tokens: 1-2 minutes per tiny preset on one core
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3  # high, as suits a few hundred steps on a model of a few million parameters
    warmup_steps: int = 30
    weight_decay: float = 0.1
    seed: int = 0


@dataclass(frozen=True)
class PretrainResult:
    """What the cached directory records about its own training."""

    preset: str
    tokenizer_fingerprint: str
    data_sha256: str
    tokens_seen: int
    first_loss: float
    final_loss: float
    seconds: float
    spec: dict[str, float | int]


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: Iterable[str], batch: int = 512) -> np.ndarray:
    """All texts tokenized and joined, each followed by the end-of-text token (int32 ids)."""
    eos = tokenizer.eos_token_id
    chunks: list[np.ndarray] = []
    pending: list[str] = []

    def flush() -> None:
        for ids in tokenizer(pending, add_special_tokens=False)["input_ids"]:
            chunks.append(np.asarray([*ids, eos], dtype=np.int32))
        pending.clear()

    for text in texts:
        pending.append(text)
        if len(pending) == batch:
            flush()
    flush()
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)


def _key(preset: ModelPreset, vocab_size: int, tokenizer_fp: str, data_sha: str, spec: PretrainSpec) -> str:
    payload = {
        "version": PRETRAIN_VERSION,
        "preset": preset.name,
        "config": preset.config(vocab_size).to_dict(),
        "tokenizer": tokenizer_fp,
        "data": data_sha,
        "spec": asdict(spec),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_model_dir(cache_root: Path, preset: ModelPreset, key: str) -> Path:
    return cache_root / "models" / "base" / f"{preset.name}-{key}"


def _lr_at(step: int, spec: PretrainSpec) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def _train(model: PreTrainedModel, ids: np.ndarray, spec: PretrainSpec, label: str) -> tuple[float, float]:
    if len(ids) <= spec.seq_len:
        raise ValueError(f"token stream of {len(ids)} tokens is shorter than one window ({spec.seq_len})")
    rng = np.random.default_rng(spec.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay
    )
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    with tqdm(range(spec.steps), desc=f"pretraining {label}", unit="step") as bar:
        for step in bar:
            starts = rng.integers(0, len(ids) - spec.seq_len, size=spec.batch_size)
            batch = torch.from_numpy(np.stack([ids[s : s + spec.seq_len] for s in starts]).astype(np.int64))
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, spec)
            loss = model(input_ids=batch, labels=batch).loss  # (B, T) -> scalar mean NLL
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{(step + 1) * batch.numel() / elapsed:,.0f}")
    model.eval()
    tail = losses[-max(1, len(losses) // 10) :]  # mean of the last tenth: one batch is noisy
    return losses[0], float(np.mean(tail))


def pretrain_base(
    preset: ModelPreset,
    tokenizer_dir: Path,
    ids: np.ndarray,
    cache_root: Path,
    spec: PretrainSpec = PretrainSpec(),
) -> Path:
    """The base checkpoint directory of `preset` (model + tokenizer), training it if not cached."""
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer_fp = fingerprint(tokenizer)
    data_sha = hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int32).tobytes()).hexdigest()
    directory = base_model_dir(cache_root, preset, _key(preset, len(tokenizer), tokenizer_fp, data_sha, spec))
    if (directory / _RESULT).is_file():
        return directory
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(preset.config(len(tokenizer)))
    started = time.perf_counter()
    first, final = _train(model, ids, spec, preset.name)
    result = PretrainResult(
        preset=preset.name,
        tokenizer_fingerprint=tokenizer_fp,
        data_sha256=data_sha,
        tokens_seen=spec.steps * spec.batch_size * spec.seq_len,
        first_loss=first,
        final_loss=final,
        seconds=time.perf_counter() - started,
        spec=asdict(spec),
    )
    with staged_directory(directory) as staged:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        # Its presence is what marks the directory as complete.
        (staged / _RESULT).write_text(json.dumps(asdict(result), indent=2) + "\n")
    return directory


def read_result(directory: Path) -> PretrainResult:
    return PretrainResult(**json.loads((directory / _RESULT).read_text()))
