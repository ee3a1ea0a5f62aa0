"""Phase III training throughput, and the cost of the MoE layer per expert implementation.

    OMP_NUM_THREADS=1 python benchmarks/bench_trainer.py            # ~1 min on one thread (46 s)
    OMP_NUM_THREADS=1 python benchmarks/bench_trainer.py --quick    # ~11-14 s
    python benchmarks/bench_trainer.py --architecture deepseek_v3 --steps 10 --repeats 5

(a) Phase III. The tiny MoE (two `student-tiny` Qwen2 students, vocab 4096, merged with
`MergeSpec(split=--split)`) is tuned with `deepfusion.cloud.trainer.tune_moe` (experts frozen; router,
attention, embeddings, norms and head trained with AdamW; loss = CE + router aux loss through
`output_router_logits=True`) and with a plain hand-written transformers loop doing the same thing (same
freezing, optimizer, clipping, batches of `--batch` full windows of `--length` tokens, same number of
steps). Each run starts from its own copy of the same merged model; runs alternate (trainer, plain,
trainer, ...) after one warm-up of each, and the table gives the median tokens/s and the ratio
trainer / plain (goal >= 1.0). The trainer's progress bar is drawn (into a buffer), as in real runs.

(b) MoE layer. Forward + backward of one sparse MoE layer (hidden 192, 2 students' FFN of 512 split into
G = E/2 experts of width 512/G, top-k 2, 8 x 128 tokens, no shared expert) with E = 8, 32, 64 experts.
transformers 4.57 has only the eager per-expert loop (`Qwen2MoeSparseMoeBlock`, `DeepseekV3MoE`; no
`experts_implementation`, grouped_mm or batched option), so it is compared with two batched references
written here over stacked expert weights: `torch.bmm` on tokens sorted by expert and padded to the
largest expert's load, and `torch._grouped_mm` on the sorted tokens (no padding; it runs on CPU in
torch 2.13). Every reference is checked against the eager block's output before timing. Median of
`--layer-repeats`; speed-up = eager Qwen2-MoE / grouped_mm.

Last measured (--quick, 1 thread of a shared 2-core CPU, torch 2.13, transformers 4.57.6; the layer
numbers are noisy at 5 repeats, the full run gave 1.1x / 1.9x / 2.8x and a phase III ratio of 1.00):

| phase III (qwen2_moe, 2 steps x 8 x 128 tok) | tokens/s (median) |
|---|---|
| tune_moe | 3,813 |
| plain loop | 3,620 |
| ratio tune_moe / plain | 1.05 |

| experts | width | eager Qwen2-MoE ms | eager DeepSeek-V3 ms | bmm padded ms | grouped_mm ms | speed-up |
|---|---|---|---|---|---|---|
| 8 | 128 | 15.6 | 15.1 | 16.5 | 13.0 | 1.2x |
| 32 | 32 | 12.6 | 13.7 | 8.3 | 6.6 | 1.9x |
| 64 | 16 | 24.8 | 16.7 | 7.4 | 5.4 | 4.6x |
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config, Qwen2ForCausalLM, Qwen2MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from deepfusion.cloud.merge import MergeSpec, merge_students_into_moe
from deepfusion.cloud.trainer import TrainSpec, tune_moe
from deepfusion.cloud.zoo.presets import get_preset

VOCAB, HIDDEN, FFN, TOP_K = 4096, 192, 512, 2


# (a) phase III -------------------------------------------------------------------------------------


def _frozen_experts(moe: torch.nn.Module) -> list[torch.nn.Parameter]:
    for name, param in moe.named_parameters():
        param.requires_grad = ".experts." not in name and ".shared_expert." not in name
    return [p for p in moe.parameters() if p.requires_grad]


def plain_loop(moe: torch.nn.Module, batches: list[torch.Tensor], lr: float) -> None:
    """The textbook transformers loop: what `tune_moe` should cost no more than."""
    params = _frozen_experts(moe)
    optimizer = torch.optim.AdamW(params, lr=lr)
    moe.train()
    for ids in batches:
        mask = torch.ones_like(ids)
        out = moe(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    moe.eval()


def bench_phase3(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(0)
    config = get_preset("student-tiny").config(VOCAB)
    students = [Qwen2ForCausalLM(config).eval() for _ in range(2)]
    moe = merge_students_into_moe(students, MergeSpec(split=args.split, architecture=args.architecture))
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, VOCAB, args.length, dtype=np.int64) for _ in range(8 * args.batch)]
    spec = TrainSpec(tune_steps=args.steps, tune_batch_size=args.batch)
    pick = np.random.default_rng(spec.seed)
    batches = [
        torch.from_numpy(np.stack([windows[i] for i in pick.choice(len(windows), args.batch, False)]))
        for _ in range(args.steps)
    ]
    tokens = args.steps * args.batch * args.length

    def run_trainer() -> float:
        model = copy.deepcopy(moe)
        started = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # the progress bar is drawn, off screen
            tune_moe(model, windows, spec)
        return tokens / (time.perf_counter() - started)

    def run_plain() -> float:
        model = copy.deepcopy(moe)
        started = time.perf_counter()
        plain_loop(model, batches, spec.tune_lr)
        return tokens / (time.perf_counter() - started)

    run_trainer(), run_plain()  # warm-up
    trainer, plain = [], []
    for _ in range(args.repeats):
        trainer.append(run_trainer())
        plain.append(run_plain())
    return {"trainer": statistics.median(trainer), "plain": statistics.median(plain)}


# (b) MoE layer --------------------------------------------------------------------------------------


def _stacked(block: Qwen2MoeSparseMoeBlock) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router [E, H], gate|up [E, H, 2w] and down [E, w, H] of an eager block, as fresh leaves."""
    experts = block.experts
    gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]).T for e in experts])
    down = torch.stack([e.down_proj.weight.T for e in experts])
    router = block.gate.weight
    return (
        router.detach().clone().requires_grad_(),
        gate_up.detach().contiguous().requires_grad_(),
        down.detach().contiguous().requires_grad_(),
    )


def _route(x: torch.Tensor, router: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-MoE routing: softmax over all experts, top-k, no renormalisation."""
    weights, chosen = torch.topk(F.softmax(x @ router.T, dim=-1, dtype=torch.float), TOP_K, dim=-1)
    return weights.to(x.dtype), chosen


def _sorted(chosen: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return order, flat[order], torch.bincount(flat, minlength=experts)


def moe_bmm(x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Batched experts with torch.bmm: tokens sorted by expert, padded to the busiest expert's load."""
    weights, chosen = _route(x, router)
    experts = gate_up.shape[0]
    order, expert, counts = _sorted(chosen, experts)
    token = order // TOP_K
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(order)) - starts[expert]
    buffer = x.new_zeros(experts, int(counts.max()), x.shape[1])
    buffer = buffer.index_put((expert, slot), x[token])
    gate, up = torch.bmm(buffer, gate_up).chunk(2, dim=-1)
    y = torch.bmm(F.silu(gate) * up, down)[expert, slot] * weights.reshape(-1)[order, None]
    return x.new_zeros(x.shape).index_add(0, token, y)


def moe_grouped(
    x: torch.Tensor, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """Batched experts with torch._grouped_mm over the tokens sorted by expert (no padding)."""
    weights, chosen = _route(x, router)
    order, _, counts = _sorted(chosen, gate_up.shape[0])
    token = order // TOP_K
    offs = torch.cumsum(counts, 0).to(torch.int32)
    gate, up = torch._grouped_mm(x[token], gate_up, offs=offs).chunk(2, dim=-1)
    y = (
        torch._grouped_mm((F.silu(gate) * up).contiguous(), down, offs=offs)
        * weights.reshape(-1)[order, None]
    )
    return x.new_zeros(x.shape).index_add(0, token, y)


def _time(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def bench_layer(experts: int, args: argparse.Namespace) -> dict[str, float]:
    width = FFN // (experts // 2)
    torch.manual_seed(experts)
    qwen = Qwen2MoeSparseMoeBlock(
        Qwen2MoeConfig(
            hidden_size=HIDDEN,
            num_experts=experts,
            num_experts_per_tok=TOP_K,
            moe_intermediate_size=width,
            shared_expert_intermediate_size=0,
            norm_topk_prob=False,
        )
    )
    for param in qwen.parameters():
        torch.nn.init.normal_(param, std=0.05)
    deepseek = DeepseekV3MoE(
        DeepseekV3Config(
            hidden_size=HIDDEN,
            n_routed_experts=experts,
            num_experts_per_tok=TOP_K,
            moe_intermediate_size=width,
            n_shared_experts=0,
            n_group=1,
            topk_group=1,
        )
    )
    for param in deepseek.parameters():
        torch.nn.init.normal_(param, std=0.05)
    x = torch.randn(8 * 128, HIDDEN, generator=torch.Generator().manual_seed(1))
    grad = torch.randn_like(x)
    stacked = _stacked(qwen)

    with torch.no_grad():
        want = qwen(x[None])[0][0]
        for reference in (moe_bmm, moe_grouped):
            torch.testing.assert_close(reference(x, *stacked), want, atol=1e-4, rtol=1e-4)

    def eager(block: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            block.zero_grad(set_to_none=True)
            inp = x[None].clone().requires_grad_()
            out = block(inp)
            out = out[0] if isinstance(out, tuple) else out
            out[0].backward(grad)

        return step

    def batched(reference: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            for param in stacked:
                param.grad = None
            inp = x.clone().requires_grad_()
            reference(inp, *stacked).backward(grad)

        return step

    return {
        "width": width,
        "qwen": _time(eager(qwen), args.layer_repeats),
        "deepseek": _time(eager(deepseek), args.layer_repeats),
        "bmm": _time(batched(moe_bmm), args.layer_repeats),
        "grouped": _time(batched(moe_grouped), args.layer_repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (< 40 s)")
    parser.add_argument("--architecture", choices=["qwen2_moe", "deepseek_v3"], default="qwen2_moe")
    parser.add_argument("--split", type=int, default=2, help="G of the merge")
    parser.add_argument("--steps", type=int, default=8, help="phase III steps per run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each loop (after a warm-up)")
    parser.add_argument("--layer-repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.layer_repeats = 2, 3, 5
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Initializing zero-element tensors")  # no shared expert

    phase3 = bench_phase3(args)
    tokens = f"{args.steps} steps x {args.batch} x {args.length} tok"
    print(f"| phase III ({args.architecture}, {tokens}) | tokens/s (median) |")
    print("|---|---|")
    print(f"| tune_moe | {phase3['trainer']:,.0f} |")
    print(f"| plain loop | {phase3['plain']:,.0f} |")
    print(f"| ratio tune_moe / plain | {phase3['trainer'] / phase3['plain']:.2f} |")
    print()
    print(
        "| experts | width | eager Qwen2-MoE ms | eager DeepSeek-V3 ms | bmm padded ms | grouped_mm ms "
        "| speed-up |"
    )
    print("|---|---|---|---|---|---|---|")
    for experts in (8, 32, 64):
        r = bench_layer(experts, args)
        print(
            f"| {experts} | {r['width']:.0f} | {r['qwen']:.1f} | {r['deepseek']:.1f} | {r['bmm']:.1f} "
            f"| {r['grouped']:.1f} | {r['qwen'] / r['grouped']:.1f}x |"
        )


if __name__ == "__main__":
    main()
