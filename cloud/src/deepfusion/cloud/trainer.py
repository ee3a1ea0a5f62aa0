"""`deepfusion-cloud train --round R`: a closed round's knowledge -> K students -> one MoE release.

    screening  devices whose packets disagree with their cluster (or understate their NLL) are
               quarantined for the round (robust.py)
    phase II   one dense student per cluster: L = CE + α·FM + β·KL (students.py); round r + 1 starts
               each cluster's student from round r's (kept in the store), round 0 from the base
    merge      students -> Qwen2MoeForCausalLM (merge.py)
    phase III  experts frozen; router, attention, embeddings, norms and head trained on the round's
               public tokens with next-token loss + the load-balancing aux loss
    release    save_pretrained + tokenizer + metrics.json under `{fed}/releases/{version}/model/`, then
               `{fed}/releases/{version}/release.json` (a ReleaseNote) that the coordinator publishes

The pieces (`train_students`, `merge_and_tune`) are also what the simulator's baselines reuse, so every
arm of a comparison trains through the same code. Checkpoint/resume and multi-process training are not
implemented.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, Qwen2ForCausalLM

from deepfusion.cloud.coordinator import release_key
from deepfusion.cloud.data import (
    Batch,
    RoundIndex,
    cluster_batches,
    index_round,
    one_cluster,
    pad_windows,
    read_clusters,
    round_windows,
)
from deepfusion.cloud.evaluate import evaluate_windows
from deepfusion.cloud.merge import MergeSpec, merge_students_into_moe
from deepfusion.cloud.robust import screen_round, screening_values
from deepfusion.cloud.rounds import round_prefix
from deepfusion.cloud.students import StudentSpec, StudentTrainer, batch_kl, warmup_cosine
from deepfusion.shared.messages import Metrics, ReleaseNote, encode_message
from deepfusion.shared.store import ObjectStore

__all__ = [
    "MetricsSink",
    "TrainSpec",
    "all_teachers",
    "download_dir",
    "evaluate_domains",
    "merge_and_tune",
    "previous_students",
    "train_round",
    "train_students",
    "tune_moe",
    "upload_dir",
]

log = logging.getLogger(__name__)

MetricsSink = Callable[[Metrics], None]
"""Where training metrics go as they are measured (the CLI publishes them on `trainer/metrics`)."""

EpochFn = Callable[[int], Iterable[Batch]]


@dataclass(frozen=True)
class TrainSpec:
    student: StudentSpec = field(default_factory=StudentSpec)
    merge: MergeSpec = field(default_factory=MergeSpec)
    tune_steps: int = 200
    """Phase III steps."""
    tune_lr: float = 5e-4
    tune_batch_size: int = 8
    tune_beta: float = 0.0
    """Phase III KL weight: > 0 also distills every clustered device's packets into the MoE while it
    is tuned (all teachers on every sequence, the student's τ); 0 tunes on next-token loss only."""
    version: str | None = None
    """Release version; default `r{round}`."""
    seed: int = 0
    warm_start: bool = True
    """Start round r's students from round r - 1's when the store has them."""
    metrics_every: int = 10
    """Steps between two metric points sent to the sink."""
    screen: bool = True
    """Quarantine hostile teachers before phase II (`deepfusion.cloud.robust`); False trusts them all."""
    screen_factor: float = 3.0
    """Quarantine a device whose disagreement is this many times its cluster's median..."""
    screen_floor: float = 0.1
    """...and above this many nats (mean Jensen-Shannon divergence to its closest partner)."""


def upload_dir(store: ObjectStore, local: Path, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            store.put(f"{prefix}{path.relative_to(local).as_posix()}", path.read_bytes())


def download_dir(store: ObjectStore, prefix: str, local: Path) -> None:
    for key in store.list(prefix):
        target = local / key[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.get(key))


def students_prefix(federation: str, round_id: int, cluster: int) -> str:
    return f"{round_prefix(federation, round_id)}students/{cluster}/"


def previous_students(
    store: ObjectStore, federation: str, round_id: int, clusters: Iterable[int]
) -> dict[int, PreTrainedModel]:
    """Round `round_id - 1`'s students by cluster (cluster ids are stable: phase I seeds KMeans with
    the previous centroids); clusters without one are absent."""
    found: dict[int, PreTrainedModel] = {}
    if round_id == 0:
        return found
    for cluster in clusters:
        prefix = students_prefix(federation, round_id - 1, cluster)
        if not store.exists(f"{prefix}config.json"):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            download_dir(store, prefix, Path(tmp))
            found[cluster] = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    return found


def all_teachers(
    store: ObjectStore, index: RoundIndex, spec: TrainSpec, exclude: Collection[str] = ()
) -> EpochFn:
    """Phase III batches carrying every clustered device's rows for each sequence of the round."""
    merged = index_round(store, index.federation, index.round, one_cluster(index.clusters), exclude)
    return lambda e: cluster_batches(
        store, merged, 0, batch_size=spec.tune_batch_size, tau=spec.student.tau, seed=spec.seed + 1000 + e
    )


def tune_moe(
    moe: torch.nn.Module,
    windows: Sequence[np.ndarray],
    spec: TrainSpec,
    *,
    teachers: EpochFn | None = None,
    sink: MetricsSink | None = None,
    label: str = "phase III",
) -> list[float]:
    """Phase III: experts (routed and shared) frozen; everything else trained with CE + aux loss, plus
    `spec.tune_beta` × the teachers' KL when `teachers` gives batches with teacher rows."""
    if not windows:
        raise ValueError("phase III needs public windows to tune on")
    for name, param in moe.named_parameters():
        # Qwen2-MoE names its shared expert `shared_expert.`, DeepSeek-V3 `shared_experts.`; the
        # `shared_expert_gate` stays trainable.
        param.requires_grad = not any(
            part in name for part in (".experts.", ".shared_expert.", ".shared_experts.")
        )
    params = [p for p in moe.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.tune_lr)
    warmup = min(10, spec.tune_steps // 10 + 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup=warmup, total=spec.tune_steps)
    )
    rng = np.random.default_rng(spec.seed)
    size = spec.tune_batch_size
    taught = _endless(teachers) if teachers is not None and spec.tune_beta > 0 else None
    losses: list[float] = []
    moe.train()
    tokens, started = 0, time.perf_counter()
    with tqdm(range(spec.tune_steps), desc=label, unit="step", leave=False, disable=None) as bar:
        for step in bar:
            batch = next(taught) if taught is not None else None
            if batch is None:
                chosen = rng.choice(len(windows), min(size, len(windows)), replace=False)
                ids, mask, _ = pad_windows([windows[k] for k in chosen])
            else:
                ids, mask = batch.input_ids, batch.attention_mask
            labels = ids.masked_fill(mask == 0, -100)
            # With labels and output_router_logits, loss = CE + router_aux_loss_coef · load-balancing loss.
            out = moe(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
            loss = out.loss
            if batch is not None:
                loss = loss + spec.tune_beta * batch_kl(out.logits, batch, spec.student.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            tokens += int(mask.sum())
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:,.0f}")
            if sink is not None and (step + 1) % spec.metrics_every == 0:
                sink(_metric(label, step + 1, {"loss": losses[-1], "tokens_per_s": rate}))
    moe.eval()
    for param in moe.parameters():
        param.requires_grad = True
    return losses


def _endless(epochs: EpochFn) -> Iterator[Batch]:
    e = 0
    while True:
        produced = False
        for batch in epochs(e):
            produced = True
            yield batch
        if not produced:
            raise ValueError("phase III has no teacher batches to distill from")
        e += 1


def _metric(phase: str, step: int, values: dict[str, float]) -> Metrics:
    # Federation and round are filled in by the sink's owner, which knows them.
    return Metrics(federation="unset", source="trainer", phase=phase, step=step, values=values)


def evaluate_domains(
    model: torch.nn.Module, heldout: Mapping[str, Sequence[np.ndarray]] | None
) -> dict[str, dict[str, float]]:
    """Held-out NLL, perplexity and accuracy of `model` on each domain's test windows."""
    return {domain: evaluate_windows(model, windows) for domain, windows in (heldout or {}).items()}


def train_students(
    epochs: Mapping[int, EpochFn],
    init: Mapping[int, PreTrainedModel],
    spec: StudentSpec,
    *,
    stages: int = 0,
    patches: int = 1,
    widths: Iterable[int] = (),
    heldout: Mapping[str, Sequence[np.ndarray]] | None = None,
    sink: MetricsSink | None = None,
    metrics_every: int = 10,
) -> tuple[dict[int, PreTrainedModel], dict[int, dict[str, Any]]]:
    """Phase II: one student per cluster, trained in sequence from a copy of `init[cluster]`."""
    students: dict[int, PreTrainedModel] = {}
    reports: dict[int, dict[str, Any]] = {}
    widths = tuple(widths)
    for cluster in sorted(epochs):
        student = copy.deepcopy(init[cluster])
        trainer = StudentTrainer(student, spec, stages=stages, patches=patches, widths=widths)
        before = evaluate_domains(student, heldout)
        with tqdm(total=spec.steps, desc=f"student {cluster}", unit="step", leave=False, disable=None) as bar:

            def on_step(step: int, losses: dict[str, float], bar: Any = bar, cluster: int = cluster) -> None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items() if k in ("loss", "kl", "fm")})
                if sink is not None and (step % metrics_every == 0 or "fm_ce_grad" in losses):
                    sink(_metric(f"phase II cluster {cluster}", step, losses))

            history = trainer.fit(epochs[cluster], on_step=on_step)
        after = evaluate_domains(student, heldout)
        ratios = [h["fm_ce_grad"] for h in history if "fm_ce_grad" in h]
        reports[cluster] = {"history": history, "before": before, "after": after, "fm_ce_grad": ratios}
        if ratios:
            log.info(
                "cluster %d: |grad a*FM| / |grad CE| in the student: mean %.3f", cluster, np.mean(ratios)
            )
        log.info(
            "cluster %d: student trained %d steps, last loss %.3f", cluster, len(history), history[-1]["loss"]
        )
        students[cluster] = student
    return students, reports


def merge_and_tune(
    students: Mapping[int, PreTrainedModel],
    windows: Sequence[np.ndarray],
    spec: TrainSpec,
    *,
    teachers: EpochFn | None = None,
    sink: MetricsSink | None = None,
) -> tuple[PreTrainedModel, list[float]]:
    """Phase III: the students (in cluster order) merged into one MoE, then tuned on `windows`."""
    moe = merge_students_into_moe(
        [cast(Qwen2ForCausalLM, students[c]) for c in sorted(students)], spec.merge, seed=spec.seed
    )
    return moe, tune_moe(moe, windows, spec, teachers=teachers, sink=sink)


def train_round(
    store: ObjectStore,
    federation: str,
    round_id: int,
    base: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    spec: TrainSpec = TrainSpec(),
    *,
    heldout: Mapping[str, Sequence[np.ndarray]] | None = None,
    sink: MetricsSink | None = None,
) -> tuple[ReleaseNote, dict[str, Any]]:
    """Train and publish the release of one closed round. Returns the note and a report of the run.

    `heldout` maps a domain to its test windows; the release's metrics are `{domain}.nll`, `.ppl`, `.acc`.
    """
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

    def send(metric: Metrics) -> None:
        if sink is not None:
            sink(metric.model_copy(update={"federation": federation, "round": round_id}))

    quarantined: dict[str, str] = {}
    if spec.screen:
        screening = screen_round(store, index, factor=spec.screen_factor, floor=spec.screen_floor)
        quarantined = screening.quarantined
        send(_metric("screening", 0, screening_values(screening)))
        if quarantined:
            index = index_round(store, federation, round_id, clusters, exclude=quarantined)

    cluster_ids = sorted(clusters.members)
    warm = previous_students(store, federation, round_id, cluster_ids) if spec.warm_start else {}
    init = {c: warm.get(c, base) for c in cluster_ids}
    log.info(
        "round %d: students start from %s", round_id, {c: "previous" if c in warm else "base" for c in init}
    )

    def epochs_of(cluster: int) -> EpochFn:
        def epoch(e: int) -> Iterator[Batch]:
            return cluster_batches(
                store,
                index,
                cluster,
                batch_size=spec.student.batch_size,
                tau=spec.student.tau,
                seed=spec.seed + e,
            )

        return epoch

    students, student_reports = train_students(
        {c: epochs_of(c) for c in cluster_ids},
        init,
        spec.student,
        stages=index.stages,
        patches=index.patches,
        widths=index.feature_widths,
        heldout=heldout,
        sink=send,
        metrics_every=spec.metrics_every,
    )
    report: dict[str, Any] = {
        "students": student_reports,
        "warm_start": sorted(warm),
        "quarantined": quarantined,
    }
    version = spec.version or f"r{round_id}"
    with tempfile.TemporaryDirectory() as tmp:
        for cluster, student in students.items():
            path = Path(tmp) / "students" / str(cluster)
            student.save_pretrained(path)
            upload_dir(store, path, students_prefix(federation, round_id, cluster))

        teachers = all_teachers(store, index, spec, quarantined) if spec.tune_beta > 0 else None
        windows = round_windows(store, index)
        moe, report["tune"] = merge_and_tune(students, windows, spec, teachers=teachers, sink=send)
        scores = evaluate_domains(moe, heldout)
        metrics = {f"{domain}.{name}": value for domain, s in scores.items() for name, value in s.items()}
        metrics["quarantined"] = float(len(quarantined))
        report["moe"] = scores
        if metrics:
            send(_metric("release", 0, metrics))

        release_dir = Path(tmp) / "release"
        moe.save_pretrained(release_dir)
        tokenizer.save_pretrained(release_dir)
        (release_dir / "metrics.json").write_text(
            json.dumps({"round": round_id, "heldout": scores, "quarantined": quarantined}, indent=1)
        )
        model_prefix = f"{federation}/releases/{version}/model/"
        upload_dir(store, release_dir, model_prefix)
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
