"""Text -> token windows -> backend scores -> `SequenceKnowledge` -> knowledge packets on disk.

Windows: each text (a JSONL record's "text", or a paragraph of a plain-text file) is tokenized by the
model's own fast tokenizer, without special tokens, and cut into consecutive windows of at most
`max_tokens` tokens. Each window is one sequence of the packets, numbered in file order; its text is
`record_text[char_start:char_end]` and its `offsets` are character spans in that window text.
`sequences.jsonl` beside the packets maps every sequence id to its record and character range.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deepfusion.edge.backends import Backend, SequenceScore
from deepfusion.edge.errors import ErrorCode, ModelError
from deepfusion.shared.fingerprint import tokenizer_fingerprint
from deepfusion.shared.packets import (
    DEFAULT_BUDGET,
    PacketBuilder,
    PacketHeader,
    SequenceKnowledge,
    apply_top_p,
)
from deepfusion.shared.textfiles import TextFileError, jsonl_text, numbered_lines

__all__ = ["ScoreReport", "ScoreSettings", "Window", "read_texts", "score_texts", "to_knowledge", "windows"]

log = logging.getLogger(__name__)

_PACKET_FILE = re.compile(r"\d{6}-[0-9a-f]{16}\.dfk")  # the names `score_texts` gives its packets


@dataclass(frozen=True)
class ScoreSettings:
    federation: str = "local"
    round: int = 0
    device: str = "device-0"
    shard: str = "local"
    top_k: int = 32
    top_p: float | None = None
    stages: int = 4  # J
    patches: int = 4  # P
    max_tokens: int = 256
    batch_size: int = 8  # sequences handed to the backend at once
    budget: int = DEFAULT_BUDGET


@dataclass(frozen=True, eq=False)
class Window:
    sequence_id: int
    record: int
    char_start: int
    char_end: int
    token_ids: np.ndarray  # [n] int64
    offsets: np.ndarray  # [n, 2] int64, relative to char_start


@dataclass(frozen=True)
class ScoreReport:
    packets: int
    sequences: int
    tokens: int
    bytes: int
    seconds: float
    feature_stages: tuple[int, ...]
    tokenizer: str

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def read_texts(path: Path) -> Iterator[str]:
    """Texts of a `.jsonl` file (string field "text" of each line) or a plain-text file (blank-line
    paragraphs); a file or line that cannot be read is a BAD_INPUT error naming the file and line."""
    if not path.is_file():
        raise ModelError(ErrorCode.BAD_INPUT, f"{path} is not a file", "pass a .jsonl or text file")
    try:
        yield from _texts(path)
    except TextFileError as exc:
        raise ModelError(ErrorCode.BAD_INPUT, str(exc), "fix or replace the file") from None


def _texts(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        for number, line in numbered_lines(path):
            if line.strip() and (text := jsonl_text(path, number, line)):
                yield text
        return
    paragraph: list[str] = []
    for _, line in numbered_lines(path):
        if line.strip():
            paragraph.append(line.rstrip("\n"))
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def windows(tokenizer: Any, texts: Iterable[str], max_tokens: int, batch: int = 64) -> Iterator[Window]:
    """Cut tokenized texts into windows of at most `max_tokens` (a `tokenizers.Tokenizer`)."""
    sequence_id = 0
    record = 0
    pending: list[str] = []

    def flush() -> Iterator[Window]:
        nonlocal sequence_id, record
        for encoding in tokenizer.encode_batch(pending, add_special_tokens=False):
            ids = np.asarray(encoding.ids, dtype=np.int64)
            offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
            for start in range(0, len(ids), max_tokens):
                span = offsets[start : start + max_tokens]
                char_start, char_end = int(span[0, 0]), int(span[:, 1].max())
                yield Window(
                    sequence_id,
                    record,
                    char_start,
                    char_end,
                    ids[start : start + max_tokens],
                    span - char_start,
                )
                sequence_id += 1
            record += 1
        pending.clear()

    for text in texts:
        pending.append(text)
        if len(pending) == batch:
            yield from flush()
    yield from flush()


def to_knowledge(
    window: Window,
    score: SequenceScore,
    top_p: float | None,
    id_dtype: Any,
    *,
    feature_stages: tuple[int, ...] | None = None,
) -> SequenceKnowledge:
    """One window's packet entry; `feature_stages`: the packet's, a subset of the score's (None: all)."""
    topk_ids = score.topk_ids.astype(id_dtype)
    logprobs = np.minimum(score.topk_logprobs, 0.0).astype(np.float16)  # float32 rounding can give +1e-7
    if top_p is not None:
        topk_ids, logprobs = apply_top_p(topk_ids, logprobs, top_p)
    return SequenceKnowledge(
        sequence_id=window.sequence_id,
        token_ids=window.token_ids.astype(id_dtype),
        offsets=window.offsets.astype(np.uint32),
        topk_ids=topk_ids,
        topk_logprobs=logprobs,
        nll=max(score.nll, 0.0),
        features=_stage_features(score, feature_stages),
    )


def _stage_features(score: SequenceScore, feature_stages: tuple[int, ...] | None) -> np.ndarray | None:
    """The float32 rows of the score's features that belong to `feature_stages` (the packet encoder
    quantizes them to int8 blocks)."""
    if score.features is None or feature_stages == ():
        return None
    if feature_stages is None:
        return score.features.astype(np.float32)
    rows = [score.feature_stages.index(stage) for stage in feature_stages]
    return score.features[rows].astype(np.float32)


def batched(items: Iterator[Window], size: int) -> Iterator[list[Window]]:
    """Consecutive lists of `size` windows (the last may be shorter)."""
    chunk: list[Window] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def packet_header(
    backend: Backend,
    *,
    federation: str,
    round_id: int,
    device: str,
    shard: str,
    tokenizer: str,
    top_k: int,
    top_p: float | None,
    stages: int,
    patches: int,
) -> PacketHeader:
    """The header of this backend's packets: the J stages it can pool (maybe none) and their width.

    A model with fewer layers than J stages pools only the stages that end a non-empty layer group
    (`Capabilities.feature_stages`). Offline scoring and the agent both build it here, so their packets
    are byte for byte the same.
    """
    feature_stages = backend.capabilities.feature_stages(backend.shape.num_layers, stages) if stages else ()
    return PacketHeader(
        federation=federation,
        round=round_id,
        device=device,
        shard=shard,
        tokenizer=tokenizer,
        vocab_size=backend.shape.vocab_size,
        top_k=top_k,
        top_p=top_p,
        stages=stages,
        patches=patches,
        feature_stages=feature_stages,
        feature_width=backend.shape.hidden_size if feature_stages else 0,
    )


def score_texts(
    backend: Backend,
    tokenizer: Any,
    texts: Iterable[str],
    output_dir: Path,
    settings: ScoreSettings = ScoreSettings(),
    *,
    progress: Any = None,
) -> ScoreReport:
    """Score `texts` with `backend` and write packets (`*.dfk`) and `sequences.jsonl` to `output_dir`."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if len(vocab) > backend.shape.vocab_size:
        raise ModelError(
            ErrorCode.VOCAB_MISMATCH,
            f"the tokenizer has {len(vocab)} tokens but the model only {backend.shape.vocab_size} outputs",
            "score with the tokenizer that was saved with this model",
        )
    fingerprint = tokenizer_fingerprint(vocab)
    header = packet_header(
        backend,
        federation=settings.federation,
        round_id=settings.round,
        device=settings.device,
        shard=settings.shard,
        tokenizer=fingerprint,
        top_k=settings.top_k,
        top_p=settings.top_p,
        stages=settings.stages,
        patches=settings.patches,
    )
    id_dtype = np.uint16 if header.vocab_size <= 2**16 - 1 else np.uint32
    builder = PacketBuilder(header, budget=settings.budget)
    output_dir.mkdir(parents=True, exist_ok=True)
    # An earlier run's packets would sit beside this run's, under a sequences.jsonl that no longer
    # describes them (their numbering even collides).
    stale = [path for path in output_dir.glob("*.dfk") if _PACKET_FILE.fullmatch(path.name)]
    if stale:
        log.warning("deleting %d packets of an earlier run in %s", len(stale), output_dir)
        for path in stale:
            path.unlink()
    counts = {"packets": 0, "sequences": 0, "tokens": 0, "bytes": 0}
    started = time.perf_counter()

    def write(packets: list[bytes]) -> None:
        if builder.skipped:  # sequences.jsonl would list a sequence that no packet holds
            raise ModelError(
                ErrorCode.BAD_INPUT,
                str(builder.skipped[0]),
                "lower --max-tokens or --top-k, or set --top-p, so one window fits a packet",
            )
        for data in packets:
            name = f"{counts['packets']:06d}-{hashlib.sha256(data).hexdigest()[:16]}.dfk"
            (output_dir / name).write_bytes(data)
            counts["packets"] += 1
            counts["bytes"] += len(data)

    with (output_dir / "sequences.jsonl").open("w", encoding="utf-8") as index:
        for chunk in batched(windows(tokenizer, texts, settings.max_tokens), settings.batch_size):
            scores = backend.score(
                [w.token_ids for w in chunk],
                top_k=settings.top_k,
                stages=settings.stages,
                patches=settings.patches,
            )
            for window, score in zip(chunk, scores, strict=True):
                knowledge = to_knowledge(
                    window, score, settings.top_p, id_dtype, feature_stages=header.feature_stages
                )
                write(builder.add(knowledge))
                entry = {k: v for k, v in asdict(window).items() if k not in ("token_ids", "offsets")}
                index.write(json.dumps({**entry, "tokens": len(window.token_ids)}) + "\n")
                counts["sequences"] += 1
                counts["tokens"] += len(window.token_ids)
            if progress is not None:
                progress(len(chunk), sum(len(w.token_ids) for w in chunk))
        write(builder.flush())
    report = ScoreReport(
        packets=counts["packets"],
        sequences=counts["sequences"],
        tokens=counts["tokens"],
        bytes=counts["bytes"],
        seconds=time.perf_counter() - started,
        feature_stages=header.feature_stages,
        tokenizer=fingerprint,
    )
    (output_dir / "score.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report
