"""`deepfusion-cloud train`: the command line of the trainer (torch is imported only when it runs)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast, get_args

import typer

__all__ = ["train"]


def _eval_sets(values: list[str]) -> dict[str, Path]:
    sets: dict[str, Path] = {}
    for value in values:
        domain, sep, path = value.partition("=")
        if not sep or not domain or not path:
            raise typer.BadParameter(f"--eval takes DOMAIN=FILE, got {value!r}")
        if not Path(path).is_file():
            raise typer.BadParameter(f"--eval {domain}: {path} is not a file")
        sets[domain] = Path(path)
    return sets


def _load(auto: Any, directory: Path, option: str, **kwargs: Any) -> Any:
    """`auto.from_pretrained(directory)`, or a usage error naming `option` when it holds none."""
    try:
        return auto.from_pretrained(directory, **kwargs)
    except (OSError, ValueError) as exc:  # no or a broken checkpoint/tokenizer there
        raise typer.BadParameter(f"{directory}: {exc}", param_hint=option) from None
    except (TypeError, AttributeError):
        # A folder without any tokenizer file (a model checkpoint alone, or nothing) fails inside
        # transformers with a message about its internals, not about the folder.
        raise typer.BadParameter(
            f"{directory}: nothing {auto.__name__} can load", param_hint=option
        ) from None


def _check_version(version: str) -> None:
    """`--version` names one folder under `{fed}/releases/`: the coordinator looks for a round's release
    exactly one level down, and the store refuses '..' and the like only once phase II has run."""
    from deepfusion.shared.store import StoreError, validate_key

    try:
        validate_key(version)
    except StoreError as exc:
        raise typer.BadParameter(str(exc), param_hint="--version") from None
    if "/" in version:
        raise typer.BadParameter(f"{version!r} must be one folder name, without '/'", param_hint="--version")


def _heldout_windows(tokenizer: Any, domain: str, path: Path, tokens: int) -> list[Any]:
    """The domain's test windows; a file that gives none would report a perfect perplexity of 1."""
    from deepfusion.cloud.evaluate import token_windows
    from deepfusion.cloud.shards import read_texts

    try:
        windows = token_windows(tokenizer, read_texts(path), tokens)
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, no "text" field, not UTF-8
        raise typer.BadParameter(f"{domain}: {path} is unreadable ({exc!r})", param_hint="--eval") from None
    if not windows:
        raise typer.BadParameter(f"{domain}: {path} has no text of 2 tokens or more", param_hint="--eval")
    return windows


def train(
    round_id: int = typer.Option(..., "--round", help="The closed round to train on."),
    base: Path = typer.Option(
        ..., exists=True, file_okay=False, help="Base student: a Qwen2 transformers checkpoint directory."
    ),
    tokenizer_dir: Path = typer.Option(
        None, "--tokenizer", exists=True, file_okay=False, help="Tokenizer to ship (default: --base's)."
    ),
    config: Path = typer.Option(None, "--config", help="Cloud config TOML."),
    overrides: list[str] = typer.Option([], "--set", help="Config override KEY=VALUE (repeatable)."),
    steps: int = typer.Option(300, help="Phase II steps per student."),
    batch_size: int = typer.Option(8, min=1, help="Sequences per phase II step."),
    lr: float = typer.Option(1e-3, help="Phase II learning rate."),
    tune_steps: int = typer.Option(200, help="Phase III steps."),
    tune_lr: float = typer.Option(5e-4, help="Phase III learning rate."),
    tune_beta: float = typer.Option(
        0.0, help="Phase III KL weight: also distill every device's packets into the MoE (0: CE only)."
    ),
    alpha: float = typer.Option(0.0, help="Feature-loss weight (0: no VAA)."),
    beta: float = typer.Option(1.0, help="KL weight."),
    temperature: float = typer.Option(1.0, help="Distillation temperature T."),
    tau: float = typer.Option(0.2, help="Teacher-quality temperature; <= 0 gives equal weights."),
    split: int = typer.Option(1, min=1, help="G: fine-grained experts per student FFN."),
    architecture: str = typer.Option(
        "qwen2_moe", help="The release's MoE: qwen2_moe (Qwen2MoeForCausalLM) or deepseek_v3."
    ),
    bias_update: float = typer.Option(
        0.0, min=0.0, help="DeepSeek-V3 only: aux-loss-free expert-bias update rate in phase III (0: off)."
    ),
    version: str = typer.Option(None, help="Release version (default r{round})."),
    warm_start: bool = typer.Option(True, help="Start from the previous round's students when stored."),
    eval_sets: list[str] = typer.Option(
        [], "--eval", help="DOMAIN=FILE (.jsonl or text): held-out test text measured on the release."
    ),
    # A window of one token predicts nothing: below 2 every file would look empty or unreadable.
    eval_tokens: int = typer.Option(128, min=2, help="Window length of the held-out evaluation."),
    publish: bool = typer.Option(True, help="Stream metrics on the trainer/metrics MQTT topic."),
    seed: int = typer.Option(0, help="Seed of the data order and the router init."),
    checkpoint_every: int = typer.Option(
        50, min=0, help="Phase II steps between checkpoints in the object store (0: none)."
    ),
    device: str = typer.Option(
        "auto", help="auto (a GPU when torch sees one), cpu, cuda or cuda:N; on a GPU with bf16 autocast."
    ),
    resume: bool = typer.Option(
        True, help="Continue a killed run of this round from its checkpoints; --no-resume starts over."
    ),
    screen: bool = typer.Option(
        True, help="Quarantine devices whose packets disagree with their cluster before distilling."
    ),
    screen_factor: float = typer.Option(
        3.0, min=1.0, help="Quarantine at this many times the cluster's median disagreement..."
    ),
    screen_floor: float = typer.Option(
        0.1, min=0.0, help="...and above this many nats of Jensen-Shannon divergence."
    ),
) -> None:
    """Distill a closed round into K students, merge them into an MoE and write the release.

    Under `torchrun --nproc-per-node N -m deepfusion.cloud.cli train ...` the students are shared
    among the N processes and phase III runs sharded (FSDP); the release is the same."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

    from deepfusion.cloud.distributed import Ranks
    from deepfusion.cloud.hardware import move, resolve_device
    from deepfusion.cloud.merge import Architecture, MergeSpec
    from deepfusion.cloud.settings import load_cloud_config
    from deepfusion.cloud.students import StudentSpec
    from deepfusion.cloud.trainer import TrainSpec, train_round
    from deepfusion.shared.config import ConfigError
    from deepfusion.shared.messages import Metrics, encode_message
    from deepfusion.shared.mqtt import MqttClient, MqttError
    from deepfusion.shared.store import StoreError, open_store
    from deepfusion.shared.topics import metrics_topic

    if architecture not in get_args(Architecture):
        choices = ", ".join(get_args(Architecture))
        raise typer.BadParameter(f"{architecture!r}; one of {choices}", param_hint="--architecture")
    if not temperature > 0:  # logits / 0 make every weight NaN, and the release is written all the same
        raise typer.BadParameter(f"{temperature}; the temperature must be > 0", param_hint="--temperature")
    if bias_update > 0 and architecture != "deepseek_v3":
        raise typer.BadParameter(
            "the expert-bias update needs the DeepSeek-V3 MoE (--architecture deepseek_v3)",
            param_hint="--bias-update",
        )
    if version:  # empty: the default
        _check_version(version)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sets = _eval_sets(eval_sets)
    try:
        settings = load_cloud_config(config, overrides)
        store = open_store(settings.store)
    except (ConfigError, StoreError) as exc:  # a bad file, override or store URI: its message says which
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        where = resolve_device(device)
    except (ValueError, RuntimeError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from None
    model = move(_load(AutoModelForCausalLM, base, "--base", dtype=torch.float32), where)
    if not isinstance(model, Qwen2ForCausalLM):  # the MoE is built from Qwen2 students
        found = type(model).__name__
        raise typer.BadParameter(f"{base} holds a {found}, not a Qwen2 model", param_hint="--base")
    if model.config.intermediate_size % split:  # checked now, not after phase II has trained the students
        width = model.config.intermediate_size
        raise typer.BadParameter(
            f"{split} does not divide the FFN width {width} of {base}", param_hint="--split"
        )
    tokenizer = _load(AutoTokenizer, tokenizer_dir or base, "--tokenizer" if tokenizer_dir else "--base")
    heldout = {d: _heldout_windows(tokenizer, d, p, eval_tokens) for d, p in sets.items()}
    spec = TrainSpec(
        student=StudentSpec(
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            alpha=alpha,
            beta=beta,
            temperature=temperature,
            tau=tau if tau > 0 else None,
        ),
        merge=MergeSpec(split=split, architecture=cast(Architecture, architecture)),
        tune_steps=tune_steps,
        tune_lr=tune_lr,
        tune_beta=tune_beta,
        version=version,
        warm_start=warm_start,
        seed=seed,
        screen=screen,
        screen_factor=screen_factor,
        screen_floor=screen_floor,
        checkpoint_every=checkpoint_every,
        resume=resume,
        bias_update=bias_update,
    )
    ranks = Ranks.from_env(where)
    client = None
    if publish:
        suffix = f"-{ranks.rank}" if ranks.world > 1 else ""
        client = MqttClient(settings.mqtt, f"trainer-{settings.federation}{suffix}")
        try:
            client.connect(timeout=5)
        except MqttError as exc:
            typer.echo(f"warning: metrics not streamed, broker unreachable: {exc}", err=True)
            client.close()
            client = None

    def sink(metric: Metrics) -> None:
        if client is not None:
            client.publish(metrics_topic(settings.federation), encode_message(metric))

    try:
        note, report = train_round(
            store,
            settings.federation,
            round_id,
            model,
            tokenizer,
            spec,
            heldout=heldout,
            sink=sink,
            ranks=ranks,
        )
    except ValueError as exc:  # a round, checkpoint or setting the trainer cannot use: its message says why
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        if client is not None:
            client.close()
        ranks.close()
    if not ranks.main:
        return
    if report["quarantined"]:
        for device, reason in sorted(report["quarantined"].items()):
            typer.echo(f"quarantined {device}: {reason}")
    typer.echo(f"release {note.version} of round {note.round}: {note.uri}")
