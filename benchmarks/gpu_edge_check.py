"""The edge on a GPU: LoRA and QLoRA fine-tuning, and the torch backend scoring on the device.

    python benchmarks/gpu_edge_check.py --model MODEL_DIR --data private.jsonl [--device cuda]

MODEL_DIR is any local transformers checkpoint with its tokenizer (the zoo's tiny presets, SmolLM2-135M,
or a Llama/Qwen2 checkpoint of your own); nothing is downloaded. Three parts, one JSON line each:

1. `finetune`: LoRA (r 8) with the edge's own `finetune` (bf16 autocast where the device has it):
   validation loss before and after, tokens/s, peak device memory.
2. `qlora`: the same on a 4-bit NF4 base (bitsandbytes, the `qlora` extra); without it, the refusal
   the user would see.
3. `scoring`: the torch backend on `--device` against the same backend on the CPU, on windows of the
   data: top-1 agreement, largest log-prob gap, NLL gap; and on the device, plain forward vs scoring
   tokens/s (the edge benchmark's ratio).

Runs on the CPU too (`--device cpu`), which is how it is checked here.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfusion.edge.backends import load_backend
from deepfusion.edge.errors import ModelError
from deepfusion.edge.finetune import FinetuneSettings, finetune
from deepfusion.edge.modelinfo import load_tokenizer
from deepfusion.edge.scoring import read_texts, windows


def _peak_memory_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def run_finetune(settings: FinetuneSettings, device: str) -> dict[str, Any]:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        result = finetune(settings, progress=False)
    except ModelError as err:
        return {"refused": str(err)}
    report = {k: v for k, v in asdict(result).items() if k != "history"}
    return {**report, "peak_device_mb": _peak_memory_mb(device)}


def run_scoring(model: Path, data: Path, device: str, tokens: int) -> dict[str, Any]:
    texts = list(read_texts(data))
    chosen = [w.token_ids for w in windows(load_tokenizer(model), texts, 256)][: max(1, tokens // 256)]
    with load_backend("torch", model, threads=None) as cpu:
        reference = cpu.score(chosen, top_k=32, stages=4, patches=4)
    with load_backend("torch", model, device=device) as backend:
        backend.score(chosen[:1], top_k=32, stages=4, patches=4)  # warm-up (kernels, allocator)
        timings = {}
        for name, call in (
            ("forward", lambda: backend.forward(chosen)),
            ("scoring", lambda: backend.score(chosen, top_k=32, stages=4, patches=4)),
        ):
            best = float("inf")
            for _ in range(3):  # best of 3
                if device == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                out = call()
                if device == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - started)
            timings[name] = best
            if name == "scoring":
                scores = out
    n = sum(len(w) for w in chosen)
    pairs = list(zip(scores, reference, strict=True))
    top1 = np.concatenate([s.topk_ids[:, 0] == r.topk_ids[:, 0] for s, r in pairs])
    gap = max(float(np.abs(s.topk_logprobs[:, 0] - r.topk_logprobs[:, 0]).max()) for s, r in pairs)
    return {
        "tokens": n,
        "top1_agreement_with_cpu": float(top1.mean()),
        "max_top1_logprob_gap": gap,
        "max_nll_gap": max(abs(s.nll - r.nll) for s, r in pairs),
        "forward_tok_s": n / timings["forward"],
        "scoring_tok_s": n / timings["scoring"],
        "ratio": timings["forward"] / timings["scoring"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="Local transformers checkpoint directory.")
    parser.add_argument("--data", type=Path, required=True, help=".jsonl or text file of private text.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30, help="Fine-tuning steps per part.")
    parser.add_argument("--tokens", type=int, default=2048, help="Tokens scored (windows of 256).")
    args = parser.parse_args()
    print(json.dumps({"device": args.device, "torch": torch.__version__,
                      "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        lora = FinetuneSettings(
            model=args.model, data=args.data, output=Path(tmp) / "lora", steps=args.steps,
            device=args.device, save_every=0, merge=True,
        )  # fmt: skip
        print(json.dumps({"part": "finetune", **run_finetune(lora, args.device)}))
        qlora = replace(lora, output=Path(tmp) / "qlora", qlora=True, merge=False)
        print(json.dumps({"part": "qlora", **run_finetune(qlora, args.device)}))
    print(json.dumps({"part": "scoring", **run_scoring(args.model, args.data, args.device, args.tokens)}))


if __name__ == "__main__":
    main()
