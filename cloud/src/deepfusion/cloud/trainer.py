"""`deepfusion-cloud train --round R`: a closed round's knowledge -> K students -> one MoE release.

    phase II   one dense student per cluster, from the base: L = CE + α·FM + β·KL (students.py)
    merge      students -> Qwen2MoeForCausalLM (merge.py)
    phase III  experts frozen; router, attention, embeddings, norms and head trained on the round's
               public tokens with next-token loss + the load-balancing aux loss
    release    save_pretrained + tokenizer under `{fed}/releases/{version}/model/`, then
               `{fed}/releases/{version}/release.json` (a ReleaseNote) that the coordinator publishes

Students are kept in `{fed}/rounds/{round}/students/{cluster}/` for inspection; starting round r + 1
from round r's students, checkpoint/resume and multi-process training are not implemented.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase, Qwen2ForCausalLM

from deepfusion.cloud.coordinator import release_key
from deepfusion.cloud.data import Batch, RoundIndex, cluster_batches, index_round, read_clusters
from deepfusion.cloud.evaluate import evaluate_windows
from deepfusion.cloud.merge import MergeSpec, merge_students_into_moe
from deepfusion.cloud.rounds import round_prefix
from deepfusion.cloud.students import StudentSpec, StudentTrainer
from deepfusion.shared.messages import ReleaseNote, encode_message
from deepfusion.shared.store import ObjectStore

__all__ = ["TrainSpec", "train_round", "tune_moe"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSpec:
    student: StudentSpec = field(default_factory=StudentSpec)
    merge: MergeSpec = field(default_factory=MergeSpec)
    tune_steps: int = 200
    """Phase III steps."""
    tune_lr: float = 5e-4
    tune_batch_size: int = 8
    version: str | None = None
    """Release version; default `r{round}`."""
    seed: int = 0


def _upload_dir(store: ObjectStore, local: Path, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            store.put(f"{prefix}{path.relative_to(local).as_posix()}", path.read_bytes())


def _public_windows(index: RoundIndex, store: ObjectStore) -> list[np.ndarray]:
    """Every distinct sequence of the round as token ids (the phase III data)."""
    unique: dict[bytes, np.ndarray] = {}
    for cluster in sorted(index.clusters.members):
        for batch in cluster_batches(store, index, cluster, batch_size=64, tau=None):
            for row, length in enumerate(batch.lengths.tolist()):
                window = batch.input_ids[row, :length].numpy()
                unique[window.tobytes()] = window
    return list(unique.values())


def tune_moe(moe: torch.nn.Module, windows: list[np.ndarray], spec: TrainSpec) -> list[float]:
    """Phase III: experts (routed and shared) frozen; everything else trained with CE + aux loss."""
    for name, param in moe.named_parameters():
        param.requires_grad = ".experts." not in name and ".shared_expert." not in name
    params = [p for p in moe.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.tune_lr)
    rng = np.random.default_rng(spec.seed)
    losses: list[float] = []
    moe.train()
    for _ in range(spec.tune_steps):
        chunk = [windows[i] for i in rng.choice(len(windows), min(spec.tune_batch_size, len(windows)), False)]
        width = max(len(w) for w in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, w in enumerate(chunk):
            ids[b, : len(w)] = torch.from_numpy(w)
            mask[b, : len(w)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        # With labels and output_router_logits, loss = CE + router_aux_loss_coef · load-balancing loss.
        out = moe(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(out.loss.detach()))
    moe.eval()
    for param in moe.parameters():
        param.requires_grad = True
    return losses


def train_round(
    store: ObjectStore,
    federation: str,
    round_id: int,
    base: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    spec: TrainSpec = TrainSpec(),
    *,
    heldout: list[np.ndarray] | None = None,
) -> tuple[ReleaseNote, dict[str, Any]]:
    """Train and publish the release of one closed round. Returns the note and a report of the run."""
    if not isinstance(base, Qwen2ForCausalLM):
        raise TypeError(
            f"students must be Qwen2ForCausalLM (the MoE is built from them), got {type(base).__name__}"
        )
    torch.manual_seed(spec.seed)
    clusters = read_clusters(store, federation, round_id)
    index = index_round(store, federation, round_id, clusters)
    if not index.sequences:
        raise ValueError(
            f"round {round_id} of {federation!r} has no knowledge packets from clustered devices"
        )
    report: dict[str, Any] = {"students": {}}
    students = []
    for cluster in sorted(clusters.members):
        student = copy.deepcopy(base)
        trainer = StudentTrainer(
            student, spec.student, stages=index.stages, patches=index.patches, widths=index.feature_widths
        )
        before = evaluate_windows(student, heldout) if heldout else None

        def epoch(e: int, cluster: int = cluster) -> Iterator[Batch]:
            return cluster_batches(
                store,
                index,
                cluster,
                batch_size=spec.student.batch_size,
                tau=spec.student.tau,
                seed=spec.seed + e,
            )

        history = trainer.fit(epoch)
        after = evaluate_windows(student, heldout) if heldout else None
        report["students"][cluster] = {"history": history, "before": before, "after": after}
        log.info(
            "cluster %d: student trained %d steps, last loss %.3f", cluster, len(history), history[-1]["loss"]
        )
        students.append(student)

    version = spec.version or f"r{round_id}"
    with tempfile.TemporaryDirectory() as tmp:
        for cluster, student in zip(sorted(clusters.members), students, strict=True):
            path = Path(tmp) / "students" / str(cluster)
            student.save_pretrained(path)
            _upload_dir(store, path, f"{round_prefix(federation, round_id)}students/{cluster}/")

        moe = merge_students_into_moe(students, spec.merge, seed=spec.seed)
        report["tune"] = tune_moe(moe, _public_windows(index, store), spec)
        metrics: dict[str, float] = {}
        if heldout:
            metrics = {f"heldout_{k}": v for k, v in evaluate_windows(moe, heldout).items()}
        report["moe"] = metrics

        release_dir = Path(tmp) / "release"
        moe.save_pretrained(release_dir)
        tokenizer.save_pretrained(release_dir)
        model_prefix = f"{federation}/releases/{version}/model/"
        _upload_dir(store, release_dir, model_prefix)
    note = ReleaseNote(
        federation=federation,
        version=version,
        round=round_id,
        uri=store.url(model_prefix.rstrip("/")),
        architecture=type(moe).__name__,
        metrics=metrics,
    )
    store.put(release_key(federation, version), encode_message(note))
    log.info("release %s of round %d written: %s", version, round_id, note.uri)
    return note, report
