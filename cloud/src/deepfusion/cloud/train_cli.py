"""`deepfusion-cloud train`: the command line of the trainer (torch is imported only when it runs)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

__all__ = ["train"]


def train(
    round_id: int = typer.Option(..., "--round", help="The closed round to train on."),
    base: Path = typer.Option(..., help="Base student: a Qwen2 transformers checkpoint directory."),
    tokenizer_dir: Path = typer.Option(None, "--tokenizer", help="Tokenizer to ship (default: --base's)."),
    config: Path = typer.Option(None, "--config", help="Cloud config TOML."),
    overrides: list[str] = typer.Option([], "--set", help="Config override KEY=VALUE (repeatable)."),
    steps: int = typer.Option(300, help="Phase II steps per student."),
    tune_steps: int = typer.Option(200, help="Phase III steps."),
    alpha: float = typer.Option(0.0, help="Feature-loss weight (0: no VAA)."),
    beta: float = typer.Option(1.0, help="KL weight."),
    tau: float = typer.Option(0.2, help="Teacher-quality temperature; <= 0 gives equal weights."),
    split: int = typer.Option(1, help="G: fine-grained experts per student FFN."),
    version: str = typer.Option(None, help="Release version (default r{round})."),
) -> None:
    """Distill a closed round into K students, merge them into an MoE and write the release."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepfusion.cloud.merge import MergeSpec
    from deepfusion.cloud.settings import load_cloud_config
    from deepfusion.cloud.students import StudentSpec
    from deepfusion.cloud.trainer import TrainSpec, train_round
    from deepfusion.shared.store import open_store

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_cloud_config(config, overrides)
    store = open_store(settings.store)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or base)
    spec = TrainSpec(
        student=StudentSpec(steps=steps, alpha=alpha, beta=beta, tau=tau if tau > 0 else None),
        merge=MergeSpec(split=split),
        tune_steps=tune_steps,
        version=version,
    )
    note, _ = train_round(store, settings.federation, round_id, model, tokenizer, spec)
    typer.echo(f"release {note.version} of round {note.round}: {note.uri}")
