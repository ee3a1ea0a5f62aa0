"""The public shard codec that the cloud writes and lists with and devices decode with."""

from __future__ import annotations

import json

import pytest
import zstandard

from deepfusion.shared.shards import ShardError, decode_shard, encode_shard


def _frame(text: str) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=True).compress(text.encode("utf-8"))


def test_texts_round_trip_with_line_breaks_json_keeps_inside_a_line() -> None:
    texts = ["plain", "two\nlines", "a\u2028separator and \u0085 next line", "ünïcode"]
    assert decode_shard(encode_shard(texts)) == texts


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ('{"text": 5}', "a number is not a text"),
        ('{"text": null}', "neither is null"),
        ('["text"]', "not an object"),
        ('{"body": "x"}', "no text field"),
        ("{not json", "not JSON"),
    ],
)
def test_a_line_without_a_string_text_is_refused_by_its_number(line: str, why: str) -> None:
    body = _frame(json.dumps({"text": "fine"}) + "\n\n" + line + "\n")
    with pytest.raises(ShardError, match=r"^line 3 is not a JSON object with a string \"text\" field"):
        decode_shard(body)


def test_bytes_that_are_not_a_shard_are_a_shard_error() -> None:
    with pytest.raises(ShardError, match="not one zstd frame"):
        decode_shard(b"plain bytes")
    with pytest.raises(ShardError, match="not UTF-8"):
        decode_shard(zstandard.ZstdCompressor().compress(b'{"text": "\xff"}\n'))


@pytest.mark.parametrize("declared", [True, False])
def test_a_shard_larger_than_the_limit_is_refused_whether_it_declares_its_size_or_not(declared: bool) -> None:
    """zstd ignores its output limit for a frame that declares its size: a bomb declaring 100 GB would be
    allocated, so the declared size is checked first."""
    lines = (json.dumps({"text": "x" * 100}) + "\n").encode()
    body = zstandard.ZstdCompressor(write_content_size=declared).compress(lines)
    assert len(decode_shard(body, max_bytes=len(lines))) == 1
    with pytest.raises(ShardError, match="over the limit of 64" if declared else "at most 64 bytes"):
        decode_shard(body, max_bytes=64)
