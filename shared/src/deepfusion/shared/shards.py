"""The public text shard format: one {"text": ...} JSON object per line, in one zstd frame.

Sequence i of a shard is line i. The cloud writes and lists shards (`deepfusion.cloud.shards`), devices
fetch and decode them (`deepfusion.edge.fetch`), both through this one codec, so a shard the cloud
plans a round on is one every device can read.

    body = encode_shard(["first text", "second text"])
    texts = decode_shard(body)     # ShardError says what is wrong, and on which line
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import zstandard

from deepfusion.shared.textfiles import NOT_A_TEXT_OBJECT, json_text

__all__ = ["MAX_SHARD_BYTES", "SUFFIX", "ShardError", "decode_shard", "encode_shard"]

SUFFIX = ".jsonl.zst"
MAX_SHARD_BYTES = 1 << 30  # decompressed; a larger "shard" is an error, not a reason to fill the disk


class ShardError(ValueError):
    """Bytes that are not a shard: not one zstd frame, too large, not UTF-8, or a line without a text."""


def encode_shard(texts: Sequence[str]) -> bytes:
    lines = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts)
    return zstandard.ZstdCompressor(level=9, write_content_size=True).compress(lines.encode("utf-8"))


def decode_shard(body: bytes, max_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """The texts of a shard's bytes, in line order."""
    try:
        # zstd sizes its output by the size a frame declares and ignores max_output_size then: a frame
        # that declares 100 GB would be allocated. So the declared size is checked first.
        declared = zstandard.frame_content_size(body)
        if declared > max_bytes:
            raise ShardError(f"declares {declared} bytes decompressed, over the limit of {max_bytes}")
        raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=max_bytes)
    except zstandard.ZstdError as exc:
        raise ShardError(f"not one zstd frame of at most {max_bytes} bytes ({exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ShardError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    texts: list[str] = []
    # Only "\n" ends a line: json.dumps escapes it, but not U+2028, U+0085 and the other breaks that
    # str.splitlines also splits on.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        value = json_text(line)
        if value is None:
            raise ShardError(f"line {number} {NOT_A_TEXT_OBJECT}")
        texts.append(value)
    return texts
