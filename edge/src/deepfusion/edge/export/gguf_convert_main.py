"""Run llama.cpp's `convert_hf_to_gguf.py` from an extracted llama-cpp-python sdist.

Executed as a script in a subprocess (`python gguf_convert_main.py VENDOR_DIR converter-args...`) so
that the sdist's own `gguf-py` (newer than PyPI's gguf) shadows any installed one and nothing of it
leaks into the caller. One patch: a ByteLevel BPE tokenizer whose pre-tokenizer hash llama.cpp does
not know (any tokenizer trained here) is declared "gpt-2", whose pre-tokenizer is exactly ByteLevel
with GPT-2's split regex; tests check that llama.cpp then gives the same ids as the tokenizer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _patch_pre_tokenizer() -> None:
    import conversion.base as base

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: object, tokenizer: object) -> str:
        try:
            return str(original(self, tokenizer))
        except NotImplementedError:
            path = Path(self.dir_model) / "tokenizer.json"  # type: ignore[attr-defined]
            pre = (json.loads(path.read_text()) if path.is_file() else {}).get("pre_tokenizer") or {}
            if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
                return "gpt-2"
            raise

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def main() -> None:
    vendor = Path(sys.argv[1])
    sys.path[:0] = [str(vendor), str(vendor / "gguf-py")]
    _patch_pre_tokenizer()
    import convert_hf_to_gguf

    sys.argv = [str(vendor / "convert_hf_to_gguf.py"), *sys.argv[2:]]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
