"""`deepfusion-edge inspect`: what a knowledge packet file holds, or why the cloud would refuse it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deepfusion.shared.packets import PacketError, decode, sentinel_for


def inspect(
    files: list[Path] = typer.Argument(
        ..., help="Packet files (.dfk) as written by the scorer or the spool."
    ),
) -> None:
    """Decode and validate knowledge packets; print their header and size, or the rejection reason.

    Exits with 1 when any file would be refused by the cloud's ingest.
    """
    console = Console()
    table = Table(
        "file", "device", "round", "shard", "seqs", "tokens", "k", "top-k mass", "features", "B/token"
    )
    refusals: list[str] = []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            refusals.append(f"{path}: unreadable: {exc.strerror}")
            continue
        try:
            packet = decode(data)
        except PacketError as err:
            refusals.append(f"{path}: {err.reason.value}: {err.detail}")
            continue
        h = packet.header
        real = packet.topk_ids != sentinel_for(packet.topk_ids.dtype)
        mass = float(
            np.exp(np.where(real, packet.topk_logprobs.astype(np.float32), -np.inf)).sum(axis=1).mean()
        )
        features = "x".join(map(str, packet.features.shape[1:])) if packet.features is not None else "none"
        table.add_row(  # cells are rich markup: a "[" in a file name or an id must stay text
            escape(str(path)), escape(h.device), str(h.round), escape(h.shard), str(len(packet)),
            str(packet.num_tokens), str(h.top_k), f"{mass:.3f}", features,
            f"{len(data) / packet.num_tokens:.1f}",
        )  # fmt: skip
    if table.row_count:
        console.print(table)
    for line in refusals:
        console.print(f"[red]refused[/] {escape(line)}", highlight=False, soft_wrap=True)
    if refusals:
        raise typer.Exit(code=1)
