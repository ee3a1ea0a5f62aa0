"""`deepfusion-cloud train --round R`: a closed round's knowledge -> K students -> one MoE release.

    screening  devices whose packets disagree with their cluster (or understate their NLL) are
               quarantined for the round (robust.py)
    phase II   one dense student per cluster: L = CE + α·FM + β·KL (students.py); round r + 1 starts
               each cluster's student from round r's (kept in the store), round 0 from the base
    merge      students -> Qwen2MoeForCausalLM (merge.py)
    phase III  experts frozen; router, attention, embeddings, norms and head trained on the round's
               public tokens with next-token loss + the load-balancing aux loss (Qwen2-MoE) or the
               aux-loss-free expert-bias update (DeepSeek-V3, `bias_update`)
    release    save_pretrained + tokenizer + metrics.json under `{fed}/releases/{version}/model/`, then
               `{fed}/releases/{version}/release.json` (a ReleaseNote) that the coordinator publishes

The pieces (`train_students`, `merge_and_tune`) are also what the simulator's baselines reuse, so every
arm of a comparison trains through the same code. Phase II checkpoints to the store every
`checkpoint_every` steps, and a restarted run resumes there (checkpoints.py) with the same result;
phase III, minutes at most, restarts from the merge. Under torchrun each rank trains its share of the
students and phase III runs sharded with FSDP (distributed.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, Qwen2ForCausalLM

from deepfusion.cloud.balance import BiasBalancer
from deepfusion.cloud.checkpoints import Checkpoints
from deepfusion.cloud.coordinator import release_key
from deepfusion.cloud.data import (
    Batch,
    RoundIndex,
    cluster_batches,
    index_round,
    one_cluster,
    pad_windows,
    read_clusters,
    round_spec,
    round_windows,
)
from deepfusion.cloud.distributed import Ranks
from deepfusion.cloud.evaluate import evaluate_windows
from deepfusion.cloud.hardware import autocast, move
from deepfusion.cloud.losses import next_token_nll, tempered_log_probs
from deepfusion.cloud.merge import (
    MergeSpec,
    check_mergeable,
    merge_students_into_moe,
    savable_generation_config,
)
from deepfusion.cloud.robust import screen_round, screening_values
from deepfusion.cloud.rounds import round_prefix
from deepfusion.cloud.students import StudentSpec, StudentTrainer, batch_kl, warmup_cosine
from deepfusion.shared.fingerprint import tokenizer_fingerprint
from deepfusion.shared.messages import Metrics, ReleaseNote, encode_message
from deepfusion.shared.store import ObjectStore

__all__ = [
    "MetricsSink",
    "TrainSpec",
    "all_teachers",
    "download_dir",
    "download_model",
    "evaluate_domains",
    "merge_and_tune",
    "previous_students",
    "train_round",
    "train_students",
    "tune_moe",
    "upload_dir",
    "upload_model",
]

log = logging.getLogger(__name__)

MetricsSink = Callable[[Metrics], None]
"""Where training metrics go as they are measured (the CLI publishes them on `trainer/metrics`)."""

EpochFn = Callable[[int], Iterable[Batch]]
Heldout = Mapping[str, Sequence[np.ndarray]] | None


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
    checkpoint_every: int = 50
    """Phase II steps between two checkpoints in the store (0: none)."""
    resume: bool = True
    """Continue from the round's stored checkpoints (a killed run); False discards them first."""
    bias_update: float = 0.0
    """Phase III on a DeepSeek-V3 MoE: the aux-loss-free expert-bias update rate (0: off; balance.py)."""


def upload_dir(store: ObjectStore, local: Path, prefix: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            store.put(f"{prefix}{path.relative_to(local).as_posix()}", path.read_bytes())


def download_dir(store: ObjectStore, prefix: str, local: Path) -> None:
    for key in store.list(prefix):
        target = local / key[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(store.get(key))


def _check_tokenizer(
    store: ObjectStore,
    federation: str,
    round_id: int,
    embeddings: int,
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """The packets hold token ids of the round's tokenizer. Another tokenizer would train the students
    on ids that mean other tokens, silently, and a base with fewer embeddings than its tokenizer has
    tokens would fail in phase III, after every student was trained."""
    tokens = len(tokenizer)
    if embeddings < tokens:
        raise ValueError(
            f"the base has {embeddings} token embeddings, fewer than its tokenizer's {tokens} tokens"
        )
    expected = (round_spec(store, federation, round_id) or {}).get("tokenizer")
    found = tokenizer_fingerprint(tokenizer.get_vocab())
    if expected is not None and found != expected:
        raise ValueError(
            f"the tokenizer (fingerprint {found[:12]}...) is not round {round_id}'s ({expected[:12]}...): "
            "the devices' token ids would mean other tokens; give the federation's tokenizer (--tokenizer)"
        )


def upload_model(store: ObjectStore, model: PreTrainedModel, prefix: str) -> None:
    """`save_pretrained` into the store under `prefix`."""
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        # A base's sampling flags without do_sample load, but do not save (savable_generation_config).
        model.generation_config = savable_generation_config(generation)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        upload_dir(store, Path(tmp), prefix)


def download_model(store: ObjectStore, prefix: str) -> PreTrainedModel:
    """A checkpoint stored under `prefix`, loaded in float32 for evaluation."""
    with tempfile.TemporaryDirectory() as tmp:
        download_dir(store, prefix, Path(tmp))
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()


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
        if store.exists(f"{prefix}config.json"):
            found[cluster] = download_model(store, prefix)
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
    ranks: Ranks = Ranks(),
) -> list[float]:
    """Phase III: experts (routed and shared) frozen; everything else trained with CE + aux loss, plus
    `spec.tune_beta` × the teachers' KL when `teachers` gives batches with teacher rows.

    Under several `ranks` the MoE is sharded with FSDP and each rank trains on its share of the same
    global batches; the CE is normalised by the global batch's token count, so the averaged gradients
    are the single-process ones. Returns the losses (averaged over ranks)."""
    if not windows:
        raise ValueError("phase III needs public windows to tune on")
    for name, param in moe.named_parameters():
        # Qwen2-MoE names its shared expert `shared_expert.`, DeepSeek-V3 `shared_experts.`; the
        # `shared_expert_gate` stays trainable.
        param.requires_grad = not any(
            part in name for part in (".experts.", ".shared_expert.", ".shared_experts.")
        )
    ranks.shard_model(moe, list(cast(Any, moe).model.layers))
    params = [p for p in moe.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.tune_lr)
    warmup = min(10, spec.tune_steps // 10 + 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_cosine, warmup=warmup, total=spec.tune_steps)
    )
    rng = np.random.default_rng(spec.seed)
    size = spec.tune_batch_size
    taught = _endless(teachers) if teachers is not None and spec.tune_beta > 0 else None
    aux_coef = float(getattr(cast(Any, moe).config, "router_aux_loss_coef", 0.0))
    device = next(moe.parameters()).device
    balancer = BiasBalancer(moe, spec.bias_update, world=ranks.world) if spec.bias_update > 0 else None
    losses: list[float] = []
    moe.train()
    tokens, started = 0, time.perf_counter()
    with tqdm(range(spec.tune_steps), desc=label, unit="step", leave=False, disable=None) as bar:
        for step in bar:
            batch = next(taught) if taught is not None else None
            if batch is None:
                chosen = rng.choice(len(windows), min(size, len(windows)), replace=False)
                batch = Batch(*pad_windows([windows[k] for k in chosen]), [])
            predicted = int((batch.attention_mask[:, :-1] * batch.attention_mask[:, 1:]).sum())
            local = ranks.slice(batch)
            # This rank's share of the batch's sequences weights its terms, so that their mean over
            # ranks (what the averaged gradients follow) is the whole batch's.
            share = local.input_ids.size(0) * ranks.world / batch.input_ids.size(0)
            if not share:
                # A batch smaller than the world leaves this rank without sequences, yet FSDP's
                # all-gathers and reduce-scatters need every rank: it runs a stand-in that counts zero.
                local = Batch(batch.input_ids[:1], batch.attention_mask[:1], batch.lengths[:1], [])
            local = local.to(device)
            with autocast(device):
                out = moe(
                    input_ids=local.input_ids, attention_mask=local.attention_mask, output_router_logits=True
                )
                log_probs = tempered_log_probs(out.logits)  # shared by the CE and, at T = 1, the KL
                summed = next_token_nll(log_probs, local.input_ids, local.attention_mask, reduction="sum")
                loss = summed * (ranks.world / max(predicted, 1) if share else 0.0)
                if getattr(out, "aux_loss", None) is not None:
                    loss = loss + aux_coef * out.aux_loss * share  # the load-balancing loss
                if local.rows:
                    t = spec.student.temperature
                    tempered = log_probs if t == 1.0 else tempered_log_probs(out.logits, t)
                    loss = loss + spec.tune_beta * _share_kl(tempered, local, batch, ranks.world, spec)
            if balancer is not None and not share:
                balancer.forget()  # the stand-in's tokens are no load
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            if balancer is not None:
                balancer.step()
            losses.append(ranks.mean(float(loss.detach())))
            tokens += int(batch.attention_mask.sum())
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:,.0f}")
            if sink is not None and (step + 1) % spec.metrics_every == 0:
                sink(_metric(label, step + 1, {"loss": losses[-1], "tokens_per_s": rate}))
    if balancer is not None:
        balancer.close()
    moe.eval()
    for param in moe.parameters():
        param.requires_grad = True
    return losses


def _share_kl(
    log_probs: torch.Tensor, local: Batch, batch: Batch, world: int, spec: TrainSpec
) -> torch.Tensor:
    """This rank's part of the global batch's KL: the mean over ranks (what the averaged gradients
    follow) is the single-process `batch_kl`, also when the ranks hold unequal shares of the batch.
    `log_probs` are this rank's, at the students' temperature."""
    share = local.input_ids.size(0) * world / batch.input_ids.size(0)
    return batch_kl(log_probs, local, spec.student.temperature) * share


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
    epochs: Mapping[int, EpochFn | None],
    init: Mapping[int, PreTrainedModel],
    spec: StudentSpec,
    *,
    stages: int = 0,
    patches: int = 1,
    widths: Iterable[int] = (),
    heldout: Mapping[str, Sequence[np.ndarray]] | None = None,
    sink: MetricsSink | None = None,
    metrics_every: int = 10,
    seed: int = 0,
    checkpoints: Checkpoints | None = None,
    checkpoint_every: int = 0,
) -> tuple[dict[int, PreTrainedModel], dict[int, dict[str, Any]]]:
    """Phase II: one student per cluster, trained in sequence from a copy of `init[cluster]`.

    A cluster whose epochs are None (no packets reached the store from it) keeps that copy untrained.
    With `checkpoints`, each cluster's state is saved every `checkpoint_every` steps and when it is
    done, and a stored state is resumed instead of starting over; the result is the same either way.
    """
    students: dict[int, PreTrainedModel] = {}
    reports: dict[int, dict[str, Any]] = {}
    for cluster in sorted(epochs):
        torch.manual_seed(seed + cluster)  # the VAA's init must not depend on the clusters before it
        student = copy.deepcopy(init[cluster])
        epoch = epochs[cluster]
        cluster_spec = spec if epoch is not None else replace(spec, steps=0)
        trainer = StudentTrainer(student, cluster_spec, stages=stages, patches=patches, widths=widths)
        run = _StudentRun(cluster, trainer, checkpoints, checkpoint_every, sink, metrics_every)
        history, before = run.resume(heldout)
        history = run.finish(epoch or (lambda e: ()), history, before)
        after = evaluate_domains(student, heldout)
        ratios = [h["fm_ce_grad"] for h in history if "fm_ce_grad" in h]
        reports[cluster] = {"history": history, "before": before, "after": after, "fm_ce_grad": ratios}
        if ratios:
            log.info(
                "cluster %d: |grad a*FM| / |grad CE| in the student: mean %.3f", cluster, np.mean(ratios)
            )
        if history:  # `steps=0` keeps the initial student (no phase II), and has no last loss
            last = history[-1]["loss"]
            log.info("cluster %d: student trained %d steps, last loss %.3f", cluster, len(history), last)
        students[cluster] = student
    return students, reports


@dataclass
class _StudentRun:
    """One cluster's phase II: progress bar, metrics and checkpoints around `StudentTrainer.fit`."""

    cluster: int
    trainer: StudentTrainer
    checkpoints: Checkpoints | None
    checkpoint_every: int
    sink: MetricsSink | None
    metrics_every: int
    done: bool = False

    def resume(self, heldout: Heldout) -> tuple[list[dict[str, float]], Any]:
        """The stored history and before-scores, with the trainer restored; or a fresh start."""
        saved = self.checkpoints.load(self.cluster) if self.checkpoints is not None else None
        if saved is None:
            return [], evaluate_domains(self.trainer.student, heldout)
        self.trainer.load_state_dict(saved["trainer"])
        self.done = bool(saved["done"])
        log.info("cluster %d: resumed at step %d", self.cluster, len(saved["history"]))
        return list(saved["history"]), saved["before"]

    def finish(self, epochs: EpochFn, history: list[dict[str, float]], before: Any) -> list[dict[str, float]]:
        spec = self.trainer.spec
        if not self.done:
            with tqdm(
                total=spec.steps, initial=len(history), desc=f"student {self.cluster}", unit="step",
                leave=False, disable=None,
            ) as bar:  # fmt: skip
                history = self.trainer.fit(
                    epochs,
                    on_step=partial(self._on_step, bar),
                    history=history,
                    on_checkpoint=partial(self._save, before=before),
                    checkpoint_every=self.checkpoint_every,
                )
            self._save(history, before=before, done=True)
        self.trainer.student.eval()
        return history

    def _on_step(self, bar: Any, step: int, losses: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items() if k in ("loss", "kl", "fm")})
        if self.sink is not None and (step % self.metrics_every == 0 or "fm_ce_grad" in losses):
            self.sink(_metric(f"phase II cluster {self.cluster}", step, losses))

    def _save(self, history: list[dict[str, float]], *, before: Any, done: bool = False) -> None:
        if self.checkpoints is not None:
            state = {"trainer": self.trainer.state_dict(), "history": history, "before": before, "done": done}
            self.checkpoints.save(self.cluster, state)


def merge_and_tune(
    students: Mapping[int, PreTrainedModel],
    windows: Sequence[np.ndarray],
    spec: TrainSpec,
    *,
    teachers: EpochFn | None = None,
    sink: MetricsSink | None = None,
    ranks: Ranks = Ranks(),
) -> tuple[PreTrainedModel, list[float]]:
    """Phase III: the students (in cluster order) merged into one MoE, then tuned on `windows`.

    Under several ranks the tuned weights are gathered into an unsharded MoE on rank 0 (the other ranks
    get the untuned merge back)."""
    ordered = [cast(Qwen2ForCausalLM, students[c]) for c in sorted(students)]
    moe = move(merge_students_into_moe(ordered, spec.merge, seed=spec.seed), ordered[0].device)
    if ranks.world == 1:
        return moe, tune_moe(moe, windows, spec, teachers=teachers, sink=sink)
    unsharded = copy.deepcopy(moe)
    losses = tune_moe(moe, windows, spec, teachers=teachers, sink=sink, ranks=ranks)
    state = ranks.full_state(moe)
    if ranks.main:
        unsharded.load_state_dict(state)
    return unsharded, losses


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
    ranks: Ranks = Ranks(),
) -> tuple[ReleaseNote, dict[str, Any]]:
    """Train and publish the release of one closed round. Returns the note and a report of the run.

    `heldout` maps a domain to its test windows; the release's metrics are `{domain}.nll`, `.ppl`, `.acc`.
    Under several `ranks` (torchrun), each rank trains its share of the students and phase III runs
    sharded (distributed.py); rank 0 writes the release, and every rank returns its note.
    """
    if not isinstance(base, Qwen2ForCausalLM):
        raise TypeError(
            f"students must be Qwen2ForCausalLM (the MoE is built from them), got {type(base).__name__}"
        )
    torch.manual_seed(spec.seed)
    clusters = read_clusters(store, federation, round_id)
    # A base the merge would refuse (its attention, a split) fails now, not after phase II.
    config = cast(Any, base).config
    check_mergeable(config, len(clusters.members), spec.merge)
    _check_tokenizer(store, federation, round_id, int(config.vocab_size), tokenizer)
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
        if ranks.main:
            send(_metric("screening", 0, screening_values(screening)))
        if quarantined:
            index = index_round(store, federation, round_id, clusters, exclude=quarantined)

    cluster_ids = sorted(clusters.members)
    # A round closed at its deadline with a quorum can leave a cluster with no packets (its devices
    # silent, or all quarantined): its expert keeps its starting student rather than failing the round.
    silent = [c for c in cluster_ids if not index.cluster_keys(c)]
    if len(silent) == len(cluster_ids):
        raise ValueError(f"round {round_id} of {federation!r} has no packets left after screening")
    for cluster in silent:
        log.warning(
            "round %d: no packets from cluster %d (%s): its expert keeps its starting student untrained",
            round_id, cluster, ", ".join(sorted(clusters.members[cluster])),
        )  # fmt: skip
    warm = previous_students(store, federation, round_id, cluster_ids) if spec.warm_start else {}
    warm = {c: move(student, base.device) for c, student in warm.items()}
    init = {c: warm.get(c, base) for c in cluster_ids}
    # Settings that change phase II invalidate its checkpoints; the rest (phase III, version) do not.
    # The students' starting weights are such a setting: a rerun from another base must not resume.
    starts = sorted((c, _weights_digest(model)) for c, model in init.items())
    fingerprint = repr((spec.student, spec.seed, spec.warm_start, sorted(quarantined), starts))
    checkpoints = Checkpoints(store, federation, round_id, fingerprint=fingerprint)
    if not spec.resume and ranks.main:
        checkpoints.clear()
    ranks.barrier()
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

    mine = ranks.share(cluster_ids)
    students, student_reports = train_students(
        {c: None if c in silent else epochs_of(c) for c in mine},
        init,
        spec.student,
        stages=index.stages,
        patches=index.patches,
        widths=index.feature_widths,
        heldout=heldout,
        sink=send,
        metrics_every=spec.metrics_every,
        seed=spec.seed,
        checkpoints=checkpoints,
        checkpoint_every=spec.checkpoint_every,
    )
    for cluster, student in students.items():
        upload_model(store, student, students_prefix(federation, round_id, cluster))
    ranks.barrier()  # every student is in the store
    for cluster in set(cluster_ids) - set(mine):
        downloaded = download_model(store, students_prefix(federation, round_id, cluster))
        students[cluster] = move(downloaded, base.device)
    report: dict[str, Any] = {
        "students": {c: r for part in ranks.gather(student_reports) for c, r in part.items()},
        "warm_start": sorted(warm),
        "untrained": silent,
        "quarantined": quarantined,
    }

    teachers = all_teachers(store, index, spec, quarantined) if spec.tune_beta > 0 else None
    windows = round_windows(store, index)
    moe, report["tune"] = merge_and_tune(
        students, windows, spec, teachers=teachers, sink=send if ranks.main else None, ranks=ranks
    )
    note = None
    if ranks.main:
        version = spec.version or f"r{round_id}"
        note, report["moe"] = _release(
            store, federation, round_id, version, moe, tokenizer, heldout, quarantined
        )
        send(_metric("release", 0, note.metrics))
        checkpoints.clear()
    released = ranks.from_main(note)
    assert released is not None
    return released, report


def _weights_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's state (names and bytes), one tensor at a time off its device."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _release(
    store: ObjectStore,
    federation: str,
    round_id: int,
    version: str,
    moe: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    heldout: Heldout,
    quarantined: dict[str, str],
) -> tuple[ReleaseNote, dict[str, dict[str, float]]]:
    """Evaluate the MoE, write the release (checkpoint, tokenizer, metrics.json) and its ReleaseNote."""
    scores = evaluate_domains(moe, heldout)
    metrics = {f"{domain}.{name}": value for domain, s in scores.items() for name, value in s.items()}
    metrics["quarantined"] = float(len(quarantined))
    model_prefix = f"{federation}/releases/{version}/model/"
    with tempfile.TemporaryDirectory() as tmp:
        release_dir = Path(tmp)
        moe.save_pretrained(release_dir)
        tokenizer.save_pretrained(release_dir)
        (release_dir / "metrics.json").write_text(
            json.dumps({"round": round_id, "heldout": scores, "quarantined": quarantined}, indent=1)
        )
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
    return note, scores
