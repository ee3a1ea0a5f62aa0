"""The federation's shared tokenizer: a ByteLevel BPE trained on the public corpus.

Every model in one federation shares one tokenizer, identified by its fingerprint (sha256 of the
vocabulary), so top-k ids in a knowledge packet mean the same token everywhere. A small vocabulary is
what makes the tiny CPU presets fast: at hidden width 192 a 49k vocabulary costs ~10x a 4k one per step.
The `real` presets use SmolLM2's tokenizer instead (see smollm2.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from deepfusion.shared.corpora import FileEntry, read_jsonl
from deepfusion.shared.corpora.cache import staged_directory
from deepfusion.shared.fingerprint import tokenizer_fingerprint

__all__ = [
    "END_OF_TEXT",
    "federation_tokenizer",
    "fingerprint",
    "load_tokenizer",
    "train_byte_level_bpe",
    "wrap_fast_tokenizer",
]

# Separates documents in training streams and pads batches; ByteLevel BPE needs no unknown token.
END_OF_TEXT = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 4096


def wrap_fast_tokenizer(tokenizer: Tokenizer, **special_tokens: str) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around a `tokenizers` one.

    `model_input_names` without token_type_ids: optimum's generate and some model forwards reject them.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, model_input_names=["input_ids", "attention_mask"], **special_tokens
    )


def train_byte_level_bpe(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE
) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style ByteLevel BPE (every byte representable, so no unknown tokens)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return wrap_fast_tokenizer(tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)


def fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    return tokenizer_fingerprint(tokenizer.get_vocab())


def load_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(directory)


def _texts(files: Sequence[Path]) -> Iterator[str]:
    for path in files:
        for document in read_jsonl(path):
            yield document.text


def federation_tokenizer(
    public: Sequence[tuple[Path, FileEntry]], cache_root: Path, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> Path:
    """Directory of the federation tokenizer trained on the public files, cached by their content.

    `public` pairs each file with its manifest entry; the key is built from the entries' sha256, so the
    same public text gives the same tokenizer (and fingerprint) whichever split directory it sits in.
    """
    key_payload = {"vocab_size": vocab_size, "data": sorted(entry.sha256 for _, entry in public)}
    key = hashlib.sha256(json.dumps(key_payload).encode()).hexdigest()[:16]
    directory = cache_root / "models" / "tokenizers" / f"bpe-{vocab_size}-{key}"
    if (directory / "tokenizer.json").is_file():
        return directory
    tokenizer = train_byte_level_bpe(_texts([path for path, _ in public]), vocab_size)
    with staged_directory(directory) as staged:
        tokenizer.save_pretrained(staged)
    return directory
