"""Phase II and III on a GPU: the trainer's own code (bf16 autocast), tokens/s and peak memory.

    python benchmarks/gpu_trainer_check.py [--device cuda] [--steps 40] [--preset student-small]

Self-contained, under 5 minutes on one GPU, nothing to download: two random-init teacher models (the
zoo's tiny Llama and GPT-2 presets) label random token windows on the same device with top-k log-probs
and pooled stage features, exactly the fields a knowledge packet carries; then one student is distilled
with CE + α·FM + β·KL (`StudentTrainer`, VAA on) and two students are merged into an MoE and tuned
(`merge_and_tune`). Runs on the CPU too (`--device cpu`), for a comparison on the same machine.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from functools import partial
from typing import TypeVar

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from deepfusion.cloud.data import Batch, TeacherRow, pad_windows
from deepfusion.cloud.hardware import move, resolve_device
from deepfusion.cloud.merge import MergeSpec
from deepfusion.cloud.students import StudentSpec, StudentTrainer
from deepfusion.cloud.trainer import TrainSpec, merge_and_tune
from deepfusion.cloud.vaa import VAAConfig, patch_pool, stage_indices
from deepfusion.cloud.zoo.presets import get_preset

VOCAB, WINDOW, WINDOWS, TOP_K, STAGES, PATCHES = 4096, 128, 256, 16, 2, 4
T = TypeVar("T")


@torch.no_grad()
def label(
    teachers: dict[str, torch.nn.Module], windows: list[np.ndarray], device: torch.device
) -> list[Batch]:
    """Batches of 8 windows, each with every teacher's top-k log-probs and pooled stage features."""
    batches = []
    for start in range(0, len(windows), 8):
        ids, mask, lengths = pad_windows(windows[start : start + 8])
        rows = []
        for name, teacher in teachers.items():
            out = teacher(input_ids=ids.to(device), output_hidden_states=True)
            logp = torch.log_softmax(out.logits.float(), -1)
            values, top = logp.topk(TOP_K, -1)
            layers = stage_indices(teacher.config.num_hidden_layers, STAGES)
            feats = torch.stack(
                [patch_pool(out.hidden_states[i].float(), lengths, PATCHES) for i in layers], 1
            )
            feats = (feats - feats.mean()) / feats.std()
            for b in range(ids.size(0)):
                rows.append(
                    TeacherRow(b, name, 1.0 / len(teachers), top[b].cpu(), values[b].cpu(), feats[b].cpu(),
                               tuple(range(STAGES)), feats.size(-1))
                )  # fmt: skip
        batches.append(Batch(ids, mask, lengths, rows))
    return batches


def timed(device: torch.device, work: Callable[[], T]) -> tuple[T, float, float]:
    """`work()`, its wall seconds and its peak GPU memory in MiB (nan on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = work()
    if device.type != "cuda":
        return result, time.perf_counter() - started, float("nan")
    torch.cuda.synchronize()
    return result, time.perf_counter() - started, torch.cuda.max_memory_allocated() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--steps", type=int, default=40, help="phase II steps per student and phase III steps"
    )
    parser.add_argument("--preset", default="student-tiny")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    windows = [rng.integers(1, VOCAB, WINDOW) for _ in range(WINDOWS)]
    teachers = {
        name: move(AutoModelForCausalLM.from_config(get_preset(name).config(VOCAB)), device).eval()
        for name in ("tiny-llama", "tiny-gpt2")
    }
    batches = label(teachers, windows, device)
    base = move(Qwen2ForCausalLM(get_preset(args.preset).config(VOCAB)), device)
    spec = StudentSpec(steps=args.steps, batch_size=8, alpha=0.1, vaa=VAAConfig(width=64))
    tokens = args.steps * 8 * WINDOW
    print(f"device {device}, student {args.preset} ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M)")

    widths = {r.width for b in batches for r in b.rows}
    students = {}
    for cluster in (0, 1):
        student = copy.deepcopy(base)
        trainer = StudentTrainer(student, spec, stages=STAGES, patches=PATCHES, widths=widths)
        history, seconds, peak = timed(device, partial(trainer.fit, lambda e: batches))
        print(
            f"phase II student {cluster}: {tokens / seconds:,.0f} tokens/s, peak {peak:,.0f} MiB, "
            f"loss {history[0]['loss']:.3f} -> {history[-1]['loss']:.3f}"
        )
        students[cluster] = student

    tune = TrainSpec(
        student=spec, merge=MergeSpec(split=2), tune_steps=args.steps, tune_batch_size=8, tune_beta=1.0
    )
    (moe, losses), seconds, peak = timed(
        device, lambda: merge_and_tune(students, windows, tune, teachers=lambda e: batches)
    )
    experts = f"{type(moe).__name__}, {moe.config.num_experts} experts"
    print(
        f"phase III ({experts}): {tokens / seconds:,.0f} tokens/s, peak {peak:,.0f} MiB, "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )


if __name__ == "__main__":
    main()
