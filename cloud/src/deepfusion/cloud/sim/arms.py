"""The comparison: every method trained with the same students, steps, MoE and evaluation code.

    control      public-only: the same students and MoE trained on the round's public windows, no teacher
    centralized  the same students and MoE trained on the devices' private text itself (upper bound)
    logit-kd     FedMKT-style: every device's top-k logits distilled straight into the MoE, equal teacher
                 weights, no features
    paper        the paper's mode: devices upload weights once, the cloud runs each full-precision device
                 model on all the public windows itself (top `paper_top_k`, full features)
    packets      this project: the trainer's release of the federation (knowledge packets over MQTT)
    packets-α0   the same run with α = 0 (the VAA ablation)
    undefended   the same run trusting every device (no screening; run when a device is hostile)
    oracle       each packets student on its own cluster's domain
    weight-avg   the element-wise mean of the packets students (a dense model)

All arms start from the same student base and get the same step budget: S phase II steps per student
and T phase III steps (logit-kd, which has no students, gets K·S + T steps on the MoE).
"""

from __future__ import annotations

import copy
import hashlib
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import numpy as np
import torch
from transformers import PreTrainedModel, Qwen2ForCausalLM

from deepfusion.cloud.data import (
    Batch,
    RoundIndex,
    cluster_batches,
    index_round,
    one_cluster,
    pad_windows,
    round_windows,
)
from deepfusion.cloud.merge import merge_students_into_moe
from deepfusion.cloud.rounds import round_prefix
from deepfusion.cloud.students import StudentSpec, StudentTrainer
from deepfusion.cloud.trainer import TrainSpec, all_teachers, evaluate_domains, merge_and_tune, train_students
from deepfusion.shared.store import ObjectStore

__all__ = ["ArmOutcome", "Arms", "ArmsSetup", "run_arm", "run_arms", "weight_average"]

Scores = dict[str, dict[str, float]]


@dataclass
class ArmOutcome:
    scores: Scores  # domain -> nll/ppl/acc/tokens
    wall_s: float


def window_batches(windows: Sequence[np.ndarray], batch_size: int, seed: int) -> Iterator[Batch]:
    """Plain language-model batches (no teacher rows) over `windows` in a seeded order."""
    order = list(range(len(windows)))
    random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield Batch(*pad_windows([windows[i] for i in order[start : start + batch_size]]), [])


@torch.no_grad()
def weight_average(students: Sequence[torch.nn.Module]) -> torch.nn.Module:
    """The element-wise mean of same-shape students: what merging costs without any routing."""
    average = copy.deepcopy(students[0])
    states = [s.state_dict() for s in students]
    average.load_state_dict({k: torch.stack([s[k].float() for s in states]).mean(0) for k in states[0]})
    return average.eval()


@dataclass
class Arms:
    """Everything the arms share; each method is one call."""

    store: ObjectStore
    federation: str
    round_id: int
    index: RoundIndex
    base: PreTrainedModel
    init: dict[int, PreTrainedModel]  # cluster -> where its student starts (the base, or last round's)
    spec: TrainSpec
    heldout: dict[str, list[np.ndarray]]
    cluster_domain: dict[int, str]
    private: dict[str, list[np.ndarray]]  # domain -> private windows of all its devices (centralized only)
    unscreened: RoundIndex  # every clustered device's packets; `index` leaves the quarantined out
    quarantined: frozenset[str] = frozenset()

    def _epochs(self, index: RoundIndex, student: StudentSpec) -> dict[int, Callable[[int], Iterator[Batch]]]:
        def of(cluster: int) -> Callable[[int], Iterator[Batch]]:
            return lambda e: cluster_batches(
                self.store,
                index,
                cluster,
                batch_size=student.batch_size,
                tau=student.tau,
                seed=self.spec.seed + e,
            )

        return {c: of(c) for c in sorted(index.clusters.members)}

    def _distill(
        self, index: RoundIndex, student: StudentSpec, exclude: frozenset[str] | None = None
    ) -> ArmOutcome:
        started = time.perf_counter()
        torch.manual_seed(self.spec.seed)
        students, _ = train_students(
            self._epochs(index, student),
            self.init,
            student,
            stages=index.stages,
            patches=index.patches,
            widths=index.feature_widths,
        )
        teachers = (
            all_teachers(self.store, index, self.spec, self.quarantined if exclude is None else exclude)
            if student.beta > 0 and self.spec.tune_beta > 0
            else None
        )
        moe, _ = merge_and_tune(students, round_windows(self.store, self.index), self.spec, teachers=teachers)
        return ArmOutcome(evaluate_domains(moe, self.heldout), time.perf_counter() - started)

    def packets_alpha0(self) -> ArmOutcome:
        return self._distill(self.index, replace(self.spec.student, alpha=0.0))

    def undefended(self) -> ArmOutcome:
        return self._distill(self.unscreened, self.spec.student, exclude=frozenset())

    def control(self) -> ArmOutcome:
        """Same windows, steps and MoE; no teacher: β = α = 0 leaves next-token CE only."""
        return self._distill(self.index, replace(self.spec.student, alpha=0.0, beta=0.0))

    def centralized(self) -> ArmOutcome:
        started = time.perf_counter()
        torch.manual_seed(self.spec.seed)
        student = replace(self.spec.student, alpha=0.0, beta=0.0)
        epochs = {
            c: (lambda e, d=domain: window_batches(self.private[d], student.batch_size, self.spec.seed + e))
            for c, domain in self.cluster_domain.items()
        }
        students, _ = train_students(epochs, self.init, student)
        union = [w for d in sorted(self.private) for w in self.private[d]]
        moe, _ = merge_and_tune(students, union, self.spec)
        return ArmOutcome(evaluate_domains(moe, self.heldout), time.perf_counter() - started)

    def logit_kd(self) -> ArmOutcome:
        """FedMKT-style: the MoE (built from K copies of the base) learns all devices' top-k directly."""
        started = time.perf_counter()
        torch.manual_seed(self.spec.seed)
        index = index_round(
            self.store, self.federation, self.round_id, one_cluster(self.index.clusters), self.quarantined
        )
        students = [cast(Qwen2ForCausalLM, self.init[c]) for c in sorted(self.init)]
        moe = merge_students_into_moe(students, self.spec.merge, seed=self.spec.seed)
        clusters = len(self.init)
        spec = replace(
            self.spec.student,
            alpha=0.0,
            tau=None,
            steps=clusters * self.spec.student.steps + self.spec.tune_steps,
        )
        StudentTrainer(moe, spec, stages=0, patches=1, widths=()).fit(
            lambda e: cluster_batches(
                self.store, index, 0, batch_size=spec.batch_size, tau=None, seed=self.spec.seed + e
            )
        )
        return ArmOutcome(evaluate_domains(moe, self.heldout), time.perf_counter() - started)

    def paper(
        self, checkpoints: Mapping[str, Path], public_texts: Sequence[str], top_k: int
    ) -> tuple[ArmOutcome, int]:
        """The cloud scores every public window with every device's uploaded full-precision model.

        Returns the outcome and the bytes of teacher knowledge the cloud computed (it never travels).
        """
        from deepfusion.edge.backends import load_backend
        from deepfusion.edge.modelinfo import load_tokenizer
        from deepfusion.edge.scoring import ScoreSettings, score_texts

        started = time.perf_counter()
        federation = f"{self.federation}-paper"
        prefix = round_prefix(federation, self.round_id)
        spec = self.index
        computed = 0
        with tempfile.TemporaryDirectory() as tmp:
            for device, checkpoint in sorted(checkpoints.items()):
                tokenizer = load_tokenizer(checkpoint)
                settings = ScoreSettings(
                    federation=federation,
                    round=self.round_id,
                    device=device,
                    shard="public",
                    top_k=top_k,
                    top_p=None,
                    stages=spec.stages,
                    patches=spec.patches,
                    max_tokens=10**6,
                    # The backend's 2,048-token micro-batches then hold 16 windows instead of 8:
                    # 8-19% more tokens/s for the demo's device models on one thread.
                    batch_size=64,
                    budget=4 * 2**20,  # well under the trainer's 64 MiB decompressed limit per packet
                )
                out = Path(tmp) / device
                with load_backend("torch", checkpoint, threads=1) as backend:
                    score_texts(backend, tokenizer, public_texts, out, settings)
                for packet in sorted(out.glob("*.dfk")):
                    data = packet.read_bytes()
                    computed += len(data)
                    sha = hashlib.sha256(data).hexdigest()
                    self.store.put(f"{prefix}knowledge/{device}/{sha}.dfk", data)
        clusters = self.index.clusters
        self.store.put(f"{prefix}clusters.json", clusters.model_dump_json().encode())
        index = index_round(self.store, federation, self.round_id, clusters)
        outcome = self._distill(index, self.spec.student)
        outcome.wall_s = time.perf_counter() - started
        return outcome, computed


def majority_domain(members: Sequence[str], domain_of: Mapping[str, str]) -> str:
    return Counter(domain_of[m] for m in members).most_common(1)[0][0]


@dataclass(frozen=True)
class ArmsSetup:
    """What a worker process needs to rebuild `Arms` (paths and specs only: it pickles)."""

    store_uri: str
    federation: str
    round_id: int
    base: Path
    tokenizer: Path
    test_files: dict[str, Path]
    max_tokens: int
    spec: TrainSpec
    cluster_domain: dict[int, str]
    private_files: dict[str, list[Path]]  # domain -> its devices' private JSONL
    checkpoints: dict[str, Path]  # device -> uploaded weights (paper mode)
    public_texts: tuple[str, ...]
    paper_top_k: int = 32
    quarantined: frozenset[str] = frozenset()  # left out by the release's screening, and by every arm

    def build(self) -> Arms:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from deepfusion.cloud.data import read_clusters
        from deepfusion.cloud.evaluate import token_windows
        from deepfusion.cloud.shards import read_texts
        from deepfusion.cloud.trainer import previous_students
        from deepfusion.shared.corpora import read_jsonl
        from deepfusion.shared.store import open_store

        torch.set_num_threads(1)
        store = open_store(self.store_uri)
        clusters = read_clusters(store, self.federation, self.round_id)
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer)
        base = AutoModelForCausalLM.from_pretrained(self.base, dtype=torch.float32).eval()
        warm = previous_students(store, self.federation, self.round_id, sorted(clusters.members))
        needed = 4 * self.spec.student.steps * self.spec.student.batch_size
        private = {
            domain: token_windows(
                tokenizer, (d.text for f in files for d in read_jsonl(f)), self.max_tokens, limit=needed
            )
            for domain, files in self.private_files.items()
        }
        index = index_round(store, self.federation, self.round_id, clusters)
        screened = (
            index_round(store, self.federation, self.round_id, clusters, self.quarantined)
            if self.quarantined
            else index
        )
        return Arms(
            store=store,
            federation=self.federation,
            round_id=self.round_id,
            index=screened,
            unscreened=index,
            quarantined=self.quarantined,
            base=base,
            init={c: warm.get(c, base) for c in clusters.members},
            spec=self.spec,
            heldout={
                d: token_windows(tokenizer, read_texts(p), self.max_tokens)
                for d, p in self.test_files.items()
            },
            cluster_domain=self.cluster_domain,
            private=private,
        )


ArmResult = tuple[Scores, float, int]
"""(scores by domain, wall seconds, bytes of knowledge the cloud computed itself)"""


def run_arm(setup: ArmsSetup, method: str) -> ArmResult:
    """One arm in this process: (scores by domain, wall seconds, bytes of cloud-computed knowledge)."""
    arms = setup.build()
    if method == "paper":
        outcome, computed = arms.paper(setup.checkpoints, setup.public_texts, setup.paper_top_k)
        return outcome.scores, outcome.wall_s, computed
    runs = {
        "public-only": arms.control,
        "centralized": arms.centralized,
        "logit-kd": arms.logit_kd,
        "packets-alpha0": arms.packets_alpha0,
        "undefended": arms.undefended,
    }
    outcome = runs[method]()
    return outcome.scores, outcome.wall_s, 0


def run_arms(
    setup: ArmsSetup,
    methods: Sequence[str],
    workers: int,
    on_done: Callable[[str, ArmResult | Exception], None],
) -> dict[str, ArmResult | Exception]:
    """Every arm in `workers` spawned processes (they are independent trainings on one core each)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from deepfusion.cloud.sim.devices import end_on_ctrl_c

    context = multiprocessing.get_context("spawn")
    results: dict[str, ArmResult | Exception] = {}
    with ProcessPoolExecutor(max(1, workers), mp_context=context, initializer=end_on_ctrl_c) as pool:
        futures = {pool.submit(run_arm, setup, method): method for method in methods}
        try:
            for future in as_completed(futures):
                method = futures[future]
                try:
                    results[method] = future.result()
                except Exception as exc:  # one failed arm must not lose the others: reported, not raised
                    results[method] = exc
                on_done(method, results[method])
        except BaseException:
            # Ctrl-C: leaving the pool waits for every queued arm, so each would be trained first.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results
