"""`deepfusion-edge finetune | export | score | info`: the model lifecycle on a device.

torch, transformers, onnxruntime and llama_cpp are imported inside the commands, so `--help` works on
an install without them; a missing one is a `missing_extra` error naming the extra to install.
Every failure prints its stable code, what went wrong and how to fix it, and exits with 2.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from enum import StrEnum
from functools import wraps
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deepfusion.edge.errors import ErrorCode, ModelError
from deepfusion.shared.messages import MAX_PATCHES, MAX_STAGES, MAX_TOP_K
from deepfusion.shared.topics import MAX_ID_LENGTH, InvalidTopic, validate_id

__all__ = ["export", "finetune", "info", "score"]

_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def _clear_errors(command: F) -> F:
    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except ModelError as error:
            _console.print(
                f"[bold red]error[/] {escape(f'[{error.code.value}] {error.message}')}", highlight=False
            )
            if error.fix:
                _console.print(f"how to fix: {escape(error.fix)}", highlight=False)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def _topic_id(value: str | None) -> str | None:
    """Ids go into every packet header; checked here, a bad one fails before the model loads."""
    if value is None:
        return None
    try:
        return validate_id(value)
    except InvalidTopic as exc:
        raise typer.BadParameter(str(exc)) from None


def _above_zero(value: float | None) -> float | None:
    # typer's min is inclusive; a top-p of 0 would keep no token at all.
    if value == 0:
        raise typer.BadParameter("must be above 0 (or left out to keep all top-k)")
    return value


def _require_text(path: Path) -> Iterator[str]:
    """The texts of `path`, with the first one read now: an unreadable or empty file fails before the
    slow model load, and an empty one before `score` clears the previous run's packets from --output."""
    from deepfusion.edge.scoring import read_texts

    texts = read_texts(path)
    first = next(texts, None)
    if first is None:
        raise ModelError(
            ErrorCode.BAD_INPUT, f"{path} holds no text", 'pass a non-empty text file or {"text": ...} lines'
        )
    return chain([first], texts)


class ExportFormat(StrEnum):
    onnx = "onnx"
    gguf = "gguf"


class BackendName(StrEnum):
    auto = "auto"
    torch = "torch"
    onnxruntime = "onnxruntime"
    llama_cpp = "llama_cpp"


@_clear_errors
def finetune(
    model: Path = typer.Argument(..., help="Base checkpoint directory (config.json, weights, tokenizer)."),
    data: Path = typer.Option(
        ..., "--data", "-d", help="Private text: .jsonl ('text' fields) or plain text."
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", file_okay=False, help="Run directory (checkpoints, adapter, merged)."
    ),
    steps: int = typer.Option(100, min=1, help="Optimizer steps."),
    batch_size: int = typer.Option(4, min=1, help="Blocks per micro-batch."),
    grad_accum: int = typer.Option(1, min=1, help="Micro-batches per optimizer step."),
    max_tokens: int = typer.Option(128, min=8, help="Block length in tokens."),
    lr: float = typer.Option(1e-3, help="Peak learning rate of the LoRA weights."),
    lora_r: int = typer.Option(8, min=1, help="LoRA rank."),
    lora_alpha: int = typer.Option(16, min=1, help="LoRA alpha (scale = alpha / r)."),
    val_fraction: float = typer.Option(0.1, min=0.0, max=0.9, help="Share of blocks held out."),
    save_every: int = typer.Option(50, min=0, help="Checkpoint every N steps (0: only at the end)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    bf16: str = typer.Option("auto", help="auto (CUDA with bf16), on or off."),
    qlora: bool = typer.Option(
        False,
        # escaped: the help is rich markup, where "[qlora]" would be a style tag and vanish
        help=escape("4-bit NF4 base: QLoRA (the [qlora] extra; CUDA, or the CPU with bitsandbytes >= 0.46)."),
    ),
    resume: bool = typer.Option(False, help="Continue from the newest checkpoint in --output."),
    merge: bool = typer.Option(False, help="Also write merged/: a plain transformers checkpoint."),
    seed: int = typer.Option(0, help="Seed of the LoRA init, the validation split and the batch order."),
    threads: int | None = typer.Option(None, min=1, help="CPU threads (default: torch's choice)."),
) -> None:
    """LoRA fine-tune a local causal LM on private text; report train and validation loss."""
    from deepfusion.edge.finetune import FinetuneSettings
    from deepfusion.edge.finetune import finetune as run

    if device not in ("auto", "cpu", "cuda") or bf16 not in ("auto", "on", "off"):
        raise ModelError(
            ErrorCode.BAD_INPUT, "bad --device or --bf16", "--device auto|cpu|cuda, --bf16 auto|on|off"
        )
    _require_text(data)
    result = run(
        FinetuneSettings(
            model=model, data=data, output=output, steps=steps, batch_size=batch_size, grad_accum=grad_accum,
            max_tokens=max_tokens, lr=lr, lora_r=lora_r, lora_alpha=lora_alpha, val_fraction=val_fraction,
            save_every=save_every, device=device, bf16=bf16, qlora=qlora, resume=resume,  # type: ignore[arg-type]
            merge=merge, seed=seed, threads=threads,
        )
    )  # fmt: skip
    typer.echo(
        f"train loss {result.train_loss_first:.3f} -> {result.train_loss_last:.3f}; "
        f"validation loss {result.val_loss_before:.3f} -> {result.val_loss_after:.3f} "
        f"({result.tokens_seen:,} tokens, {result.seconds:.1f} s, {result.device} {result.precision}, "
        f"base {'4-bit NF4' if qlora else 'float32'} {result.base_bytes / 1e6:,.1f} MB)"
    )
    typer.echo(f"adapter: {result.adapter}" + (f"\nmerged: {result.merged}" if result.merged else ""))


@_clear_errors
def export(
    model: Path = typer.Argument(..., help="Transformers checkpoint directory."),
    format: ExportFormat = typer.Option(..., "--format", "-f", help="onnx or gguf."),
    output: Path = typer.Option(..., "--output", "-o", file_okay=False, help="Output directory."),
    quant: str | None = typer.Option(
        None, help="onnx: fp32 | int8 (default int8); gguf: f16 | q8_0 | q4_k_m (default q8_0)."
    ),
    keep_forward: bool = typer.Option(False, help="onnx: also write forward.onnx (logits only)."),
    threads: int | None = typer.Option(None, min=1, help="Threads for GGUF quantization."),
) -> None:
    """Export a checkpoint to an ONNX scoring graph or to a quantized GGUF file."""
    if format is ExportFormat.onnx:
        from deepfusion.edge.export.onnx import export_onnx

        quant = quant or "int8"
        if quant not in ("fp32", "int8"):
            raise ModelError(
                ErrorCode.BAD_INPUT, f"--quant {quant} is not an ONNX option", "use fp32 or int8"
            )
        path = export_onnx(model, output, quant=quant, keep_forward=keep_forward)  # type: ignore[arg-type]
    else:
        from deepfusion.edge.export.gguf import export_gguf

        quant = quant or "q8_0"
        if quant not in ("f16", "q8_0", "q4_k_m", "f32"):
            raise ModelError(
                ErrorCode.BAD_INPUT, f"--quant {quant} is not a GGUF option", "use f16, q8_0 or q4_k_m"
            )
        path = export_gguf(model, output, quant=quant, threads=threads)  # type: ignore[arg-type]
    typer.echo(f"{path} ({path.stat().st_size / 1e6:,.1f} MB)")


def _backend_for(model: Path, backend: BackendName) -> str:
    if backend is not BackendName.auto:
        return backend.value
    from deepfusion.edge.modelinfo import model_info

    return model_info(model).backends[0]


@_clear_errors
def score(
    model: Path = typer.Argument(..., help="Checkpoint directory, ONNX export directory or .gguf file."),
    input: Path = typer.Option(
        ..., "--input", "-i", help="Public text: .jsonl ('text' fields) or plain text."
    ),
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        file_okay=False,
        help="Folder for the packets (*.dfk); an earlier run's packets there are replaced.",
    ),
    backend: BackendName = typer.Option(BackendName.auto, help="Runtime (auto: from the model's format)."),
    top_k: int = typer.Option(32, min=1, max=MAX_TOP_K, help="Next-token log-probs kept per token."),
    top_p: float | None = typer.Option(
        None, min=0.0, max=1.0, callback=_above_zero, help="Keep the shortest top-k prefix reaching p."
    ),
    stages: int = typer.Option(4, min=0, max=MAX_STAGES, help="J: stages of pooled hidden states (0: none)."),
    patches: int = typer.Option(4, min=1, max=MAX_PATCHES, help="P: patches per stage."),
    max_tokens: int = typer.Option(256, min=2, help="Window length in tokens."),
    batch_size: int = typer.Option(8, min=1, help="Windows per backend call."),
    threads: int | None = typer.Option(None, min=1, help="Runtime threads."),
    federation: str = typer.Option(
        "local", callback=_topic_id, help="Federation id written into the packets."
    ),
    round: int = typer.Option(0, min=0, help="Round number written into the packets."),
    device: str = typer.Option("device-0", callback=_topic_id, help="Device id written into the packets."),
    shard: str | None = typer.Option(
        None, callback=_topic_id, help="Shard id (default: the input file's name)."
    ),
) -> None:
    """Score a text file with a backend and write knowledge packets to a folder."""
    import re

    from deepfusion.edge.backends import load_backend
    from deepfusion.edge.modelinfo import load_tokenizer
    from deepfusion.edge.scoring import ScoreSettings, score_texts

    texts = _require_text(input)
    name = _backend_for(model, backend)
    tokenizer = load_tokenizer(model)
    stem = re.sub(r"[^a-z0-9._-]+", "-", input.stem.lower())[:MAX_ID_LENGTH]
    shard_id = shard or stem.strip("-._") or "local"
    settings = ScoreSettings(
        federation=federation, round=round, device=device, shard=shard_id, top_k=top_k, top_p=top_p,
        stages=stages, patches=patches, max_tokens=max_tokens, batch_size=batch_size,
    )  # fmt: skip
    # llama.cpp sizes its KV cache by the context it is given: the windows', not the model's longest.
    options = {"context": max_tokens} if name == "llama_cpp" else {}
    with load_backend(name, model, threads=threads, **options) as runner:
        report = score_texts(runner, tokenizer, texts, output, settings)
    typer.echo(
        f"{report.packets} packets, {report.sequences} sequences, {report.tokens:,} tokens, "
        f"{report.bytes / max(report.tokens, 1):.1f} B/token, {report.tokens_per_second:,.0f} tokens/s "
        f"({name}; feature stages {list(report.feature_stages)}) -> {output}"
    )


@_clear_errors
def info(
    model: Path = typer.Argument(..., help="Checkpoint directory, ONNX export directory or .gguf file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Architecture, size, tokenizer fingerprint and the backends that can run the model."""
    from deepfusion.edge.backends import available_backends
    from deepfusion.edge.modelinfo import model_info

    found = model_info(model)
    installed = available_backends()
    data = found.as_dict()
    data["backends_installed"] = [b for b in found.backends if b in installed]
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table(show_header=False)
    rows = [
        ("path", str(found.path)),
        ("format", found.format),
        ("architecture", found.shape.architecture),
        ("layers / width", f"{found.shape.num_layers} / {found.shape.hidden_size}"),
        ("vocabulary (logits)", f"{found.shape.vocab_size:,}"),
        ("context", f"{found.shape.context:,}"),
        ("parameters", "unknown" if found.parameters is None else f"{found.parameters / 1e6:,.2f}M"),
        ("size on disk", f"{found.file_bytes / 1e6:,.1f} MB"),
        ("weights", found.quantization),
        ("tokenizer fingerprint", found.tokenizer_fingerprint or "no tokenizer.json"),
        ("tokenizer vocabulary", "-" if found.tokenizer_vocab is None else f"{found.tokenizer_vocab:,}"),
        (
            "backends",
            ", ".join(f"{b} ({'installed' if b in installed else 'not installed'})" for b in found.backends),
        ),
    ]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)
