"""LoRA fine-tuning of a local causal LM on the device's private text (peft), CPU or CUDA.

    result = finetune(FinetuneSettings(model="base/", data="notes.jsonl", output="run/", steps=200))

Data: the texts of a `.jsonl` ("text" fields) or plain-text file, tokenized with the model's tokenizer,
joined with the end-of-text token and cut into blocks of `max_tokens`; a seeded `val_fraction` of the
blocks (at least one, and never all of them) is held out for the validation loss. Training: AdamW on
the LoRA weights only (every linear layer but the LM head), linear warm-up then constant, gradient
accumulation, gradient clipping at 1.0; bf16 autocast where the hardware supports it (CUDA with
bf16); optionally a 4-bit NF4 base (QLoRA, the `qlora` extra: bitsandbytes), on CUDA or on the CPU
(bitsandbytes >= 0.46 runs 4-bit layers on the CPU too, which is how the tests check this path); the
LoRA weights stay float32.

The output directory holds `checkpoints/step-N/` (adapter, optimizer and RNG state; `--resume` picks
the newest; a run without it first deletes those of an earlier run), `adapter/` (the final LoRA
adapter), `merged/` with `merge=True` (a plain transformers checkpoint: the base in float32 with the
adapter folded in, loadable without peft) and `result.json`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from deepfusion.edge.errors import ErrorCode, ModelError, require
from deepfusion.edge.modelinfo import read_hf_config
from deepfusion.edge.scoring import read_texts

__all__ = ["FinetuneResult", "FinetuneSettings", "evaluate_loss", "finetune", "merge_adapter"]

log = logging.getLogger(__name__)

_BNB_CPU = "0.46"  # the first bitsandbytes with a CPU backend for 4-bit layers


@dataclass(frozen=True)
class FinetuneSettings:
    model: Path  # base checkpoint directory (config.json, weights, tokenizer)
    data: Path  # .jsonl or text file of private text
    output: Path
    steps: int = 100  # optimizer steps
    batch_size: int = 4  # blocks per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_tokens: int = 128  # block length
    lr: float = 1e-3  # LoRA tolerates a much higher rate than full fine-tuning
    warmup_steps: int = 10
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    val_fraction: float = 0.1
    eval_batches: int = 8  # validation micro-batches per evaluation (bounded cost)
    save_every: int = 50  # checkpoint period in optimizer steps (0: only at the end)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: Literal["auto", "on", "off"] = "auto"
    qlora: bool = False
    resume: bool = False
    merge: bool = False
    threads: int | None = None


@dataclass(frozen=True)
class FinetuneResult:
    steps: int
    tokens_seen: int
    train_loss_first: float
    train_loss_last: float  # mean of the last tenth of the steps
    val_loss_before: float
    val_loss_after: float
    seconds: float
    device: str
    precision: str
    adapter: str
    merged: str | None
    base_bytes: int  # the base model's weights in memory: 4-bit NF4 with `qlora`, float32 otherwise
    history: list[dict[str, float]] = field(default_factory=list)


def _blocks(tokenizer: Any, data: Path, max_tokens: int) -> np.ndarray:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    stream: list[int] = []
    for text in read_texts(data):
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(eos)
    count = len(stream) // max_tokens
    if count < 2:
        raise ModelError(
            ErrorCode.BAD_INPUT,
            f"{data} gives {len(stream)} tokens: fewer than two blocks of {max_tokens}",
            "provide more text or lower --max-tokens",
        )
    return np.asarray(stream[: count * max_tokens], dtype=np.int64).reshape(count, max_tokens)


def _device(settings: FinetuneSettings, torch: Any) -> str:
    if settings.device == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(
                ErrorCode.NO_CUDA, "no CUDA device is available", "train with --device cpu or auto"
            )
        return "cuda"
    if settings.device == "auto" and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _precision(settings: FinetuneSettings, device: str, torch: Any) -> str:
    if settings.bf16 == "off":
        return "fp32"
    if settings.bf16 == "on":
        return "bf16"
    return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def _load_base(settings: FinetuneSettings, device: str, precision: str, torch: Any) -> Any:
    transformers = require("transformers")
    if not settings.qlora:
        model = transformers.AutoModelForCausalLM.from_pretrained(settings.model, dtype=torch.float32)
        return model.to(device)
    _require_bitsandbytes(device)
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
        bnb_4bit_use_double_quant=True,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        settings.model, quantization_config=quantization, device_map={"": 0 if device == "cuda" else "cpu"}
    )
    # On CPUs with bf16 units, bitsandbytes (0.50) repacks a 4-bit layer for a faster kernel the first
    # time it runs in eval mode (the validation loss before training) and keeps that layout once training
    # starts, where the kernel has no backward: the gradients through the base were silently wrong (the
    # tests' run went from 6.10 to 6.26 validation loss instead of down). Training keeps the plain layout.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model = _require_peft().prepare_model_for_kbit_training(
        model, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model.config.use_cache = False  # it turned gradient checkpointing on, which has no use for a cache
    return model


def _require_peft() -> Any:
    """peft, which imports bitsandbytes when it is installed.

    bitsandbytes' CPU backend then warns, on CPUs with bf16 units, that it could fetch a faster kernel
    from the Hugging Face hub (the `kernels` package): devices are offline, and its fallback works.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    return require("peft")


def _require_bitsandbytes(device: str) -> None:
    try:
        import bitsandbytes
    except ImportError:
        raise ModelError(
            ErrorCode.MISSING_EXTRA,
            "QLoRA needs bitsandbytes, which is not installed",
            "pip install 'deepfusion-edge[qlora]', or train without --qlora",
        ) from None
    from packaging.version import Version  # installed with transformers

    if device == "cpu" and Version(bitsandbytes.__version__) < Version(_BNB_CPU):
        raise ModelError(
            ErrorCode.MISSING_EXTRA,
            f"bitsandbytes {bitsandbytes.__version__} runs 4-bit layers on CUDA only",
            "pip install 'deepfusion-edge[qlora]' (bitsandbytes >= 0.46 runs them on the CPU too), "
            "or train on a CUDA device",
        )


def evaluate_loss(
    model: Any, blocks: np.ndarray, batch_size: int, device: str, limit: int | None = None
) -> float:
    """Mean next-token loss over `blocks` (at most `limit` micro-batches), token-weighted."""
    torch = require("torch")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for i, start in enumerate(range(0, len(blocks), batch_size)):
            if limit is not None and i >= limit:
                break
            batch = torch.from_numpy(blocks[start : start + batch_size]).to(device)
            loss = model(input_ids=batch, labels=batch).loss
            tokens = batch.shape[0] * (batch.shape[1] - 1)
            total += float(loss) * tokens
            count += tokens
    model.train(was_training)
    return total / max(count, 1)


def _latest_checkpoint(output: Path) -> Path | None:
    """The newest complete checkpoint; `step-N.partial/` is a save that was cut short."""
    steps = {
        int(match[1]): state.parent
        for state in output.glob("checkpoints/step-*/trainer_state.pt")
        if (match := re.fullmatch(r"step-(\d+)", state.parent.name))
    }
    return steps[max(steps)] if steps else None


def _clear_checkpoints(output: Path) -> None:
    """Delete an earlier run's checkpoints, which a later `--resume` of this run would pick up."""
    checkpoints = output / "checkpoints"
    if checkpoints.exists():
        log.warning("deleting %s: checkpoints of an earlier run (pass --resume to continue it)", checkpoints)
        shutil.rmtree(checkpoints)


def _save_checkpoint(
    output: Path, step: int, model: Any, optimizer: Any, history: list[dict[str, float]]
) -> None:
    torch = require("torch")
    directory = output / "checkpoints" / f"step-{step}"
    partial = directory.with_name(directory.name + ".partial")
    if partial.exists():  # from a save of this step that was cut short before a resume
        shutil.rmtree(partial)
    model.save_pretrained(partial)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "history": history,
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
    }
    torch.save(state, partial / "trainer_state.pt")
    if directory.exists():  # incomplete (no trainer state), so the resume did not start from it
        shutil.rmtree(directory)
    partial.replace(directory)


def merge_adapter(base: Path, adapter: Path, output: Path) -> Path:
    """base (float32) + LoRA adapter -> a plain transformers checkpoint in `output`."""
    torch = require("torch")
    transformers = require("transformers")
    peft = _require_peft()
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    # Many released checkpoints' generation_config.json set sampling flags (temperature, top_p) without
    # do_sample: transformers loads that with a warning but refuses to save it, which failed the merge
    # after the whole run. The merged folder gets a valid default, then the base's own file, verbatim.
    merged.generation_config = transformers.GenerationConfig.from_model_config(merged.config)
    merged.save_pretrained(output)
    if (base / "generation_config.json").is_file():
        shutil.copy2(base / "generation_config.json", output / "generation_config.json")
    transformers.AutoTokenizer.from_pretrained(base).save_pretrained(output)
    return output


def finetune(settings: FinetuneSettings, *, progress: bool = True) -> FinetuneResult:
    torch = require("torch")
    transformers = require("transformers")
    peft = _require_peft()
    from tqdm.auto import tqdm

    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = _device(settings, torch)
    precision = _precision(settings, device, torch)
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.manual_seed(settings.seed)

    read_hf_config(settings.model)  # a folder that is no checkpoint fails here, with its reason
    tokenizer = transformers.AutoTokenizer.from_pretrained(settings.model)
    blocks = _blocks(tokenizer, settings.data, settings.max_tokens)
    order = np.random.default_rng(settings.seed).permutation(len(blocks))
    # At least one block on each side: a few blocks and a large fraction would leave none to train on.
    n_val = min(max(1, round(len(blocks) * settings.val_fraction)), len(blocks) - 1)
    val, train = blocks[order[:n_val]], blocks[order[n_val:]]

    model = _load_base(settings, device, precision, torch)
    base_bytes = int(model.get_memory_footprint())
    lora = peft.LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    history: list[dict[str, float]] = []
    start_step = 0
    output = settings.output
    output.mkdir(parents=True, exist_ok=True)
    if not settings.resume:
        _clear_checkpoints(output)
    # Before a checkpoint is loaded: the LoRA weights start at zero, so this is the base model's loss.
    val_before = evaluate_loss(model, val, settings.batch_size, device, settings.eval_batches)
    checkpoint = _latest_checkpoint(output) if settings.resume else None
    if checkpoint is not None:
        peft.set_peft_model_state_dict(model, peft.load_peft_weights(str(checkpoint), device=device))
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])
        start_step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])

    rng = np.random.default_rng(settings.seed + start_step)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")
    model.train()
    started = time.perf_counter()
    tokens = 0
    bar = tqdm(
        range(start_step, settings.steps),
        initial=start_step,
        total=settings.steps,
        desc="LoRA",
        unit="step",
        disable=not progress,
    )
    for step in bar:
        lr = settings.lr * min(1.0, (step + 1) / max(1, settings.warmup_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = 0.0
        for _ in range(settings.grad_accum):
            rows = rng.integers(0, len(train), size=settings.batch_size)
            batch = torch.from_numpy(train[rows]).to(device)  # (B, T)
            with autocast:
                loss = model(input_ids=batch, labels=batch).loss / settings.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
            tokens += batch.numel()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step + 1, "loss": step_loss, "lr": lr})
        elapsed = time.perf_counter() - started
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):,.0f}")
        if settings.save_every and (step + 1) % settings.save_every == 0 and step + 1 < settings.steps:
            _save_checkpoint(output, step + 1, model, optimizer, history)
    bar.close()
    if settings.steps > start_step:
        _save_checkpoint(output, settings.steps, model, optimizer, history)
    val_after = evaluate_loss(model, val, settings.batch_size, device, settings.eval_batches)
    adapter = output / "adapter"
    model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)
    merged = None
    if settings.merge:
        merged = merge_adapter(settings.model, adapter, output / "merged")
    losses = [h["loss"] for h in history] or [math.nan]
    result = FinetuneResult(
        steps=settings.steps,
        tokens_seen=tokens,
        train_loss_first=losses[0],
        train_loss_last=float(np.mean(losses[-max(1, len(losses) // 10) :])),
        val_loss_before=val_before,
        val_loss_after=val_after,
        seconds=time.perf_counter() - started,
        device=device,
        precision=precision,
        adapter=str(adapter),
        merged=None if merged is None else str(merged),
        base_bytes=base_bytes,
        history=history,
    )
    payload = asdict(result)
    payload["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()}
    (output / "result.json").write_text(json.dumps(payload, indent=2) + "\n")
    return result
