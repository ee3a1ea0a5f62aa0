"""The model zoo: presets, the federation tokenizer, SmolLM2 conversion and base pretraining.

Modules: `presets` (named transformers configs), `tokenizer` (federation ByteLevel BPE), `smollm2`
(GGUF -> standard checkpoint), `pretrain` (short base pretraining, cached by content hash). Import the
module you need: each pulls in torch and transformers, which the package root deliberately does not.
"""
