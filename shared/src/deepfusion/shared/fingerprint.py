"""Fingerprints that let peers check they speak about the same things without shipping them."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

__all__ = ["tokenizer_fingerprint"]


def tokenizer_fingerprint(vocab: Mapping[str, int]) -> str:
    """sha256 (hex) of a tokenizer's vocabulary: the token strings in id order.

    The vocabulary is what every format keeps (a `tokenizer.json`, a GGUF's token list, an ONNX
    export's tokenizer), so a device and the cloud compute the same fingerprint from whichever copy
    they hold. Two tokenizers with the same fingerprint give the same ids the same meaning, which is
    what top-k packets need. Ids must be 0..n-1 without gaps.
    """
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    if any(index != token_id for index, (_, token_id) in enumerate(ordered)):
        raise ValueError("vocabulary ids must be 0..n-1 without gaps or duplicates")
    tokens = [token for token, _ in ordered]
    payload = json.dumps(tokens, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()
