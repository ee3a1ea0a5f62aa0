"""One simulated federation from profile to report (`deepfusion-cloud simulate`).

assets -> devices (fine-tune, export) -> federation (broker, store, services, rounds, releases)
       -> evaluation and comparison arms -> bills -> results/<run>/report.md, metrics.json, plots/
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from deepfusion.cloud import bills
from deepfusion.cloud.sim.devices import (
    DeviceBuild,
    DeviceJob,
    build_devices,
    finetune_options,
    write_device_config,
)
from deepfusion.cloud.sim.federation import FederationOutcome, FederationPlan, FederationRunner
from deepfusion.cloud.sim.profile import SimProfile
from deepfusion.cloud.sim.results import (
    BillRow,
    Check,
    DeviceRow,
    DomainScore,
    MethodRow,
    RoundPoint,
    RunResults,
    ScalePoint,
)
from deepfusion.shared.broker import EmbeddedBroker
from deepfusion.shared.config import MqttConfig, mqtt_toml, toml_string
from deepfusion.shared.mqtt import MqttClient
from deepfusion.shared.packets import KnowledgePacket, decode, encode
from deepfusion.shared.store import ObjectStore, open_store

__all__ = ["SimOptions", "simulate_run"]

ARMS = {
    "public-only": ("public-only control (no device knowledge)", ""),
    "centralized": (
        "centralized (private text uploaded)",
        "upper bound: the private data leaves the devices",
    ),
    "logit-kd": ("logit-only KD into the MoE (FedMKT-style)", "top-k logits of all devices, equal weights"),
    "packets-alpha0": ("DeepFusion packets, α = 0 (no VAA)", "the VAA ablation of the packets run"),
    "paper": ("DeepFusion paper mode (weights uploaded once)", "the cloud scores all public windows itself"),
}
UNDEFENDED = (
    "DeepFusion packets, no screening",
    "every device trusted, the hostile one included",
)
MAX_PACKET = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class SimOptions:
    devices: int | None = None
    broker: str | None = None  # mqtt://host:port; None starts mosquitto
    store: str | None = None  # None: results/<run>/store
    out: Path = Path("results")
    drop: str | None = None  # device to kill mid-round
    poison: str | None = None  # device that publishes poisoned knowledge (`sim.attack`)
    secure: bool = False  # TLS, one credential per device and service, broker ACLs
    baselines: bool = True
    paper_top_k: int = 32
    workers: int = 2
    cache_root: Path | None = None


@dataclasses.dataclass
class Traffic:
    """Per device: packets and bytes stored (uplink), public shard bytes handed to it (downlink).

    Also, over all packets: the bytes they would have without their features (`logit_bytes`, each
    re-encoded) and the tokens x feature width of those with features, which locate the feature part of
    the bill and the hidden width it was measured at.
    """

    packets: dict[str, int] = dataclasses.field(default_factory=dict)
    uplink: dict[str, int] = dataclasses.field(default_factory=dict)
    downlink: dict[str, int] = dataclasses.field(default_factory=dict)
    tokens: dict[str, int] = dataclasses.field(default_factory=dict)
    logit_bytes: int = 0
    feature_tokens: int = 0
    feature_width_tokens: int = 0

    def mean(self, field: str, devices: int) -> float:
        return sum(getattr(self, field).values()) / devices

    @property
    def bytes_per_token(self) -> float:
        return sum(self.uplink.values()) / max(1, sum(self.tokens.values()))

    @property
    def logit_share(self) -> float:
        """Bytes of the packets without their features over bytes with them."""
        total = sum(self.uplink.values())
        return self.logit_bytes / total if total else 1.0

    @property
    def feature_bytes_per_token(self) -> float:
        if not self.feature_tokens:
            return 0.0
        return max(0.0, self.bytes_per_token * (1.0 - self.logit_share))

    @property
    def feature_width(self) -> float:
        """Hidden width of the features, weighted by the tokens of the packets that carry them."""
        return self.feature_width_tokens / self.feature_tokens if self.feature_tokens else 0.0


def _score(values: dict[str, float]) -> DomainScore:
    return DomainScore(nll=values["nll"], ppl=values["ppl"], acc=values["acc"], tokens=int(values["tokens"]))


def _scores(scores: dict[str, dict[str, float]]) -> dict[str, DomainScore]:
    return {domain: _score(values) for domain, values in scores.items()}


def _mqtt(broker: str) -> MqttConfig:
    host, _, port = broker.removeprefix("mqtt://").partition(":")
    if not host or not (port or "1883").isdigit():
        raise ValueError(f"--broker {broker}: expected mqtt://HOST:PORT")
    return MqttConfig(host=host, port=int(port or 1883))


def _clear_outputs(out: Path) -> None:
    """Remove an earlier run's outputs from `out`, so a failed or smaller rerun cannot leave its report,
    logs (another process layout, a hostile device, more rounds) or release beside this run's. The caches
    (work/, the default store) stay."""
    for name in ("report.md", "metrics.json", "plots", "logs", "release"):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _probe(mqtt: MqttConfig) -> None:
    """Connect to the broker once and leave; MqttError (a RuntimeError) when it cannot be reached."""
    client = MqttClient(mqtt, f"simulator-probe-{os.getpid()}")
    try:
        client.connect()
    finally:
        client.close()


def _fresh(store: ObjectStore, *federations: str) -> None:
    """A run starts from an empty federation: earlier rounds would make the coordinator resume them."""
    for federation in federations:
        for key in list(store.list(f"{federation}/")):
            store.delete(key)


def _cloud_toml(profile: SimProfile, mqtt: MqttConfig, store_uri: str, devices: int) -> str:
    top_p = "" if profile.packets.top_p is None else f"top_p = {profile.packets.top_p}\n"
    mqtt = mqtt.model_copy(update={"reconnect_min_s": 0.2, "reconnect_max_s": 2.0})
    return (
        f'federation = "{profile.federation}"\n'
        f"{mqtt_toml(mqtt)}"
        f"[store]\nuri = {toml_string(store_uri)}\n"
        f"[ingest]\nstats_interval_s = 1.0\n"
        f"[coordinator]\nclusters = {profile.clusters}\nredundancy = {profile.redundancy}\n"
        f"min_devices = {devices}\nround_s = {profile.round_s}\nquorum = {profile.quorum}\n"
        f"max_rounds = {profile.rounds}\ntick_s = 0.5\ntop_k = {profile.packets.top_k}\n{top_p}"
        f"stages = {profile.packets.stages}\npatches = {profile.packets.patches}\n"
        f"max_tokens = {profile.data.max_tokens}\nseed = {profile.seed}\n"
    )


def _train_args(
    profile: SimProfile, student_base: Path, tokenizer: Path, tests: dict[str, Path]
) -> list[str]:
    s, m = profile.student, profile.moe
    args = ["--base", str(student_base), "--tokenizer", str(tokenizer), "--steps", str(s.steps)]
    args += ["--batch-size", str(s.batch_size), "--lr", str(s.lr), "--tune-steps", str(m.tune_steps)]
    args += ["--tune-lr", str(m.tune_lr), "--tune-beta", str(m.tune_beta)]
    args += ["--alpha", str(s.alpha), "--beta", str(s.beta)]
    args += ["--temperature", str(s.temperature), "--tau", str(s.tau or 0), "--split", str(m.split)]
    args += ["--seed", str(profile.seed), "--eval-tokens", str(profile.data.max_tokens)]
    for domain, path in sorted(tests.items()):
        args += ["--eval", f"{domain}={path}"]
    return args


def _train_spec(profile: SimProfile) -> Any:
    from deepfusion.cloud.merge import MergeSpec
    from deepfusion.cloud.students import StudentSpec
    from deepfusion.cloud.trainer import TrainSpec

    s = profile.student
    return TrainSpec(
        student=StudentSpec(
            steps=s.steps,
            batch_size=s.batch_size,
            lr=s.lr,
            alpha=s.alpha,
            beta=s.beta,
            temperature=s.temperature,
            tau=s.tau,
        ),
        merge=MergeSpec(split=profile.moe.split),
        tune_steps=profile.moe.tune_steps,
        tune_lr=profile.moe.tune_lr,
        tune_beta=profile.moe.tune_beta,
        seed=profile.seed,
    )


def _traffic(store: ObjectStore, federation: str, outcome: FederationOutcome) -> Traffic:
    t = Traffic()
    for state in outcome.states:
        shard_bytes = {
            s.shard: len(store.get(f"{federation}/shards/{s.shard}.jsonl.zst")) for s in state.spec.shards
        }
        for device, assignments in state.spec.assignments.items():
            t.downlink[device] = t.downlink.get(device, 0) + sum(
                shard_bytes[a] for a in {a.shard for a in assignments}
            )
        for key in store.list(f"{federation}/rounds/{state.round}/knowledge/"):
            if key.endswith(".dfk"):
                device, data = key.split("/")[-2], store.get(key)
                packet = decode(data, max_bytes=MAX_PACKET)
                tokens = int(packet.seq_lengths.sum())
                t.packets[device] = t.packets.get(device, 0) + 1
                t.uplink[device] = t.uplink.get(device, 0) + len(data)
                t.tokens[device] = t.tokens.get(device, 0) + tokens
                t.logit_bytes += _bytes_without_features(packet)
                if packet.features is not None:
                    t.feature_tokens += tokens
                    t.feature_width_tokens += tokens * packet.header.feature_width
    return t


def _bytes_without_features(packet: KnowledgePacket) -> int:
    header = packet.header.model_copy(update={"feature_stages": (), "feature_width": 0})
    return len(encode(dataclasses.replace(packet, header=header, features=None)))


class _Phases:
    def __init__(self, console: Console) -> None:
        self.console, self.started, self.number = console, time.perf_counter(), 0

    def __call__(self, name: str, what: str) -> None:
        self.number += 1
        elapsed = time.perf_counter() - self.started
        self.console.rule(f"[dim]{elapsed:.0f} s[/] [bold]{self.number}. {name}[/] — {what}")


def _release_points(outcome: FederationOutcome, domains: list[str]) -> list[RoundPoint]:
    points = []
    for note in sorted({n.version: n for n in outcome.releases}.values(), key=lambda n: n.round):
        if all(f"{d}.nll" in note.metrics for d in domains):
            scores = {
                d: _score({k: note.metrics[f"{d}.{k}"] for k in ("nll", "ppl", "acc", "tokens")})
                for d in domains
            }
            points.append(RoundPoint(round=note.round, method="packets", scores=scores))
    return points


def simulate_run(profile: SimProfile, options: SimOptions, console: Console) -> RunResults:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deepfusion.cloud.security import broker_listener_config
    from deepfusion.cloud.shards import publish_texts
    from deepfusion.cloud.sim.arms import ArmResult, ArmsSetup, majority_domain, run_arms, weight_average
    from deepfusion.cloud.sim.assets import prepare_assets
    from deepfusion.cloud.sim.report import console_table, write_report
    from deepfusion.cloud.trainer import download_dir, evaluate_domains, previous_students
    from deepfusion.shared.corpora import read_jsonl, resolve_cache_root

    torch.set_num_threads(1)
    started_at, started = datetime.now(UTC), time.perf_counter()
    fleet = profile.fleet(options.devices)
    names = [d for d, _, _ in fleet]
    for flag, device in (("--drop", options.drop), ("--poison", options.poison)):
        if device is not None and device not in names:
            raise ValueError(f"{flag} {device}: no such device (devices: {', '.join(names)})")
    if options.secure and options.broker is not None:
        raise ValueError("--secure starts its own broker with the generated TLS and ACL setup; drop --broker")
    if options.drop is not None and options.drop == options.poison:
        raise ValueError("--drop and --poison name the same device; pick two")
    out = options.out.resolve() / profile.name
    work = out / "work"
    # A bad --store or --broker fails here, not after the assets and devices (minutes to hours): each is
    # used once, so an unreachable one is found too, not only a malformed one.
    store_uri = options.store or str(out / "store")
    store = open_store(store_uri)
    _fresh(store, profile.federation, f"{profile.federation}-paper")
    given = _mqtt(options.broker) if options.broker is not None else None
    if given is not None:
        _probe(given)
    _clear_outputs(out)
    per_domain = max(sum(t.domain == d for _, t, _ in fleet) for d in ("medical", "finance"))
    step = _Phases(console)

    step("assets", f"corpora, splits for {per_domain} devices per domain, tokenizer, base models")
    assets = prepare_assets(profile, per_domain, resolve_cache_root(options.cache_root), work)

    step("devices", f"{len(fleet)} devices: LoRA fine-tune on private text, merge, export")
    jobs = [
        DeviceJob(
            device=device,
            domain=t.domain,
            preset=t.preset,
            backend=t.backend,
            share=share,
            base=str(assets.device_bases[t.preset]),
            private=str(assets.private_files[(t.domain, share)]),
            directory=str(work / "devices" / device),
            max_tokens=profile.data.max_tokens,
            finetune=finetune_options(profile.finetune),
            seed=profile.seed + i,
        )
        for i, (device, t, share) in enumerate(fleet)
    ]

    def built(b: DeviceBuild) -> None:
        console.print(
            f"  {b.job.device:7} {b.job.preset:11} {b.job.backend:12} val loss {b.val_loss_before:.3f} -> "
            f"{b.val_loss_after:.3f} ({b.finetune_s:.0f} s fine-tune, {b.export_s:.0f} s export)"
        )

    builds = {b.job.device: b for b in build_devices(jobs, workers=options.workers, on_done=built)}

    step("federation", "broker, object store, ingest, coordinator, agents, trainer")
    security = work / "security" if options.secure else None
    accounts = _enroll(security, profile.federation, names) if security else {}
    listener = broker_listener_config(security) if security else ["allow_anonymous true"]
    embedded: EmbeddedBroker | None = None
    if given is None:
        embedded = EmbeddedBroker(workdir=work / "mosquitto", listener_config=listener).start()
        mqtt = embedded.config()
    else:
        mqtt = given

    def account(name: str) -> MqttConfig:
        """`name`'s credentials on this broker (anonymous when the run is not secured)."""
        if name not in accounts:
            return mqtt
        return accounts[name].model_copy(update={"host": mqtt.host, "port": mqtt.port})

    where = "embedded mosquitto " if embedded else ""
    scheme = "mqtts (TLS, one account per device and service, ACLs)" if security else "mqtt"
    console.print(f"  broker {where}{scheme}://{mqtt.host}:{mqtt.port}, store {store_uri}")
    try:
        shards = publish_texts(store, profile.federation, assets.public_texts, name="public", per_shard=256)
        console.print(f"  {len(assets.public_texts)} public sequences in {len(shards)} shards")
        cloud_configs = {}
        for service in ("ingest", "coordinator", "trainer"):
            cloud_configs[service] = work / f"cloud-{service}.toml"
            cloud_configs[service].write_text(_cloud_toml(profile, account(service), store_uri, len(fleet)))
            cloud_configs[service].chmod(0o600)
        device_configs = {}
        for device, b in builds.items():
            state = work / "agents" / device
            shutil.rmtree(state / "spool", ignore_errors=True)  # a rerun must not resend last run's packets
            # The device to drop is on a slow link, so it is killed with its packets still unsent.
            slow = 2048 if device == options.drop else 0
            device_configs[device] = write_device_config(
                b, profile.federation, account(device), state, uplink_bytes_s=slow
            )
        plan = FederationPlan(
            federation=profile.federation,
            rounds=profile.rounds,
            mqtt=account("observer"),
            store=store,
            cloud_configs=cloud_configs,
            device_configs=device_configs,
            train_args=_train_args(profile, assets.student_base, assets.tokenizer_dir, assets.test_files),
            logs=out / "logs",
            devices_per_process=profile.devices_per_process,
            drop=options.drop,
            hostile=options.poison,
            attack_args=["--target", str(_poison_target(assets.tokenizer_dir))] if options.poison else [],
            timeout_s=profile.round_s * profile.rounds + 3600,
        )
        outcome = FederationRunner(plan, console).run()
    finally:
        if embedded is not None:
            embedded.close()
    last = outcome.states[-1] if outcome.states else None
    if last is None or last.status != "closed" or last.release is None:
        raise RuntimeError(f"the federation ended without a release; see the logs in {out / 'logs'}")

    step("evaluation", "base, devices, release and students on the fixed test windows")
    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    heldout = assets.heldout(tokenizer, profile.data.max_tokens)
    domains = sorted(heldout)
    clusters = last.clusters
    domain_of = {d: b.job.domain for d, b in builds.items()}
    cluster_domain = {c: majority_domain(m, domain_of) for c, m in clusters.members.items()}
    traffic = _traffic(store, profile.federation, outcome)
    n = len(fleet)
    up, down = traffic.mean("uplink", n), traffic.mean("downlink", n)
    logit_share = traffic.logit_share

    base = AutoModelForCausalLM.from_pretrained(assets.student_base, dtype=torch.float32).eval()
    rows = [
        MethodRow(
            method="base",
            label="base student before federation",
            scores=_scores(evaluate_domains(base, heldout)),
        )
    ]
    points = [RoundPoint(round=-1, method="base", scores=rows[0].scores), *_release_points(outcome, domains)]
    device_rows = []
    for device, b in builds.items():
        model = AutoModelForCausalLM.from_pretrained(b.checkpoint, dtype=torch.float32).eval()
        scores = _scores(evaluate_domains(model, heldout))
        device_rows.append(
            DeviceRow(
                device=device,
                domain=b.job.domain,
                preset=b.job.preset,
                architecture=b.architecture,
                backend=b.job.backend,
                cluster=clusters.assignment.get(device),
                share_docs=sum(1 for _ in read_jsonl(Path(b.job.private))),
                finetune_val_before=b.val_loss_before,
                finetune_val_after=b.val_loss_after,
                packets=traffic.packets.get(device, 0),
                uplink_bytes=traffic.uplink.get(device, 0),
                downlink_bytes=traffic.downlink.get(device, 0),
                dropped=device in outcome.dropped,
                scores=scores,
            )
        )
        rows.append(
            MethodRow(
                method=f"device:{device}",
                label=f"device {device} alone ({b.job.domain}, {b.job.preset})",
                scores=scores,
            )
        )

    release_dir = out / "release"
    download_dir(store, f"{profile.federation}/releases/{last.release}/model/", release_dir)
    moe = AutoModelForCausalLM.from_pretrained(release_dir, dtype=torch.float32).eval()
    quarantined: dict[str, str] = json.loads((release_dir / "metrics.json").read_text())["quarantined"]
    rows.append(
        MethodRow(
            method="packets",
            label="DeepFusion (packets over MQTT)",
            scores=_scores(evaluate_domains(moe, heldout)),
            uplink_bytes_per_device=up,
            downlink_bytes_per_device=down,
            wall_s=outcome.wall_s,
            note=f"federation wall time, of which {outcome.train_s:.0f} s training",
        )
    )
    students = previous_students(store, profile.federation, last.round + 1, sorted(clusters.members))
    oracle = {
        cluster_domain[c]: evaluate_domains(s, {cluster_domain[c]: heldout[cluster_domain[c]]})[
            cluster_domain[c]
        ]
        for c, s in students.items()
    }
    rows.append(
        MethodRow(
            method="oracle",
            label="packets students, oracle routing (each on its domain)",
            scores=_scores(oracle),
        )
    )
    average = evaluate_domains(weight_average(list(students.values())), heldout)
    rows.append(
        MethodRow(
            method="weight-average",
            label="plain weight average of the packets students",
            scores=_scores(average),
        )
    )

    device_params = sum(b.params for b in builds.values()) / n
    private_bytes = sum(Path(b.job.private).stat().st_size for b in builds.values()) / n
    bills_up = {
        "public-only": 0.0,
        "centralized": private_bytes,
        "logit-kd": up * logit_share,
        "packets-alpha0": up * logit_share,
        "paper": device_params * 4,
    }
    bills_down = {
        "public-only": down,
        "centralized": 0.0,
        "logit-kd": down,
        "packets-alpha0": down,
        "paper": 0.0,
    }
    methods = dict(ARMS) | ({"undefended": UNDEFENDED} if options.poison else {})
    bills_up["undefended"], bills_down["undefended"] = up, down
    computed = 0
    failed: list[str] = []
    if options.baselines:
        step(
            "baselines",
            f"{len(methods)} methods, same students, steps, MoE and test windows, "
            f"{options.workers} at a time",
        )
        setup = ArmsSetup(
            store_uri=store_uri,
            federation=profile.federation,
            round_id=last.round,
            base=assets.student_base,
            tokenizer=assets.tokenizer_dir,
            test_files=assets.test_files,
            max_tokens=profile.data.max_tokens,
            spec=_train_spec(profile),
            cluster_domain=cluster_domain,
            private_files={
                d: [Path(b.job.private) for b in builds.values() if b.job.domain == d] for d in domains
            },
            checkpoints={d: Path(b.checkpoint) for d, b in builds.items() if d not in outcome.dropped},
            public_texts=tuple(assets.public_texts),
            paper_top_k=options.paper_top_k,
            quarantined=frozenset(quarantined),
        )

        def done(method: str, result: ArmResult | Exception) -> None:
            if isinstance(result, Exception):
                console.print(f"  [red]{methods[method][0]} failed:[/] {result}", highlight=False)
            else:
                console.print(f"  {methods[method][0]}: {result[1]:.0f} s")

        # Longest first (measured on the demo), so two workers finish together.
        order = ["paper", "logit-kd", "packets-alpha0", "public-only", "centralized"]
        order[1:1] = [m for m in methods if m not in order]
        for method, result in run_arms(setup, order, options.workers, done).items():
            label, note = methods[method]
            if isinstance(result, Exception):
                failed.append(method)
                rows.append(MethodRow(method=method, label=label, scores={}, note=f"failed: {result}"))
                continue
            measured, wall, extra = result
            computed += extra
            rows.append(
                MethodRow(
                    method=method,
                    label=label,
                    scores=_scores(measured),
                    uplink_bytes_per_device=bills_up[method],
                    downlink_bytes_per_device=bills_down[method],
                    wall_s=wall,
                    note=note,
                )
            )
            points.append(RoundPoint(round=last.round, method=method, scores=rows[-1].scores))
        rows = rows[: len(rows) - len(methods)] + sorted(
            rows[len(rows) - len(methods) :], key=lambda r: list(methods).index(r.method)
        )

    rounds = len(outcome.states)
    expert_total = sum(p.numel() for name, p in moe.named_parameters() if ".experts." in name)
    experts = moe.config.num_experts
    trunk = sum(p.numel() for p in moe.parameters()) - expert_total
    fedjets = bills.fedjets_bill(trunk, expert_total // experts, 1, rounds, 4.0)
    bill_rows = [
        BillRow(
            method="packets",
            uplink_bytes=up,
            downlink_bytes=down,
            rounds=rounds,
            note=f"{traffic.bytes_per_token:.1f} B per public token, measured",
        ),
        BillRow(
            method="logit-kd",
            uplink_bytes=up * logit_share,
            downlink_bytes=down,
            rounds=rounds,
            note=f"the packets without features ({logit_share:.0%} of their bytes)",
        ),
        BillRow(
            method="paper",
            uplink_bytes=device_params * 4,
            downlink_bytes=0,
            rounds=1,
            note="fp32 weights, once",
        ),
        BillRow(
            method="fedjets",
            uplink_bytes=fedjets.uplink_bytes,
            downlink_bytes=fedjets.downlink_bytes,
            rounds=rounds,
            note="trunk + 1 expert down and up per round, fp32",
        ),
        BillRow(
            method="centralized",
            uplink_bytes=private_bytes,
            downlink_bytes=0,
            rounds=1,
            note="raw private text: the data leaves the device",
        ),
    ]
    tokens = traffic.mean("tokens", n) / rounds
    real = bills.real_size_table(
        traffic.bytes_per_token,
        int(tokens),
        rounds=rounds,
        experts=max(2, experts),
        feature_bytes_per_token=traffic.feature_bytes_per_token,
        feature_width=traffic.feature_width,
    )
    results = RunResults(
        run=profile.name,
        profile=profile.name,
        started_at=started_at,
        wall_s=time.perf_counter() - started,
        domains=domains,
        config=profile.model_dump(mode="json")
        | {"devices_run": n, "paper_top_k": options.paper_top_k, "paper_computed_bytes": computed},
        rows=rows,
        devices=device_rows,
        rounds=points,
        bills=bill_rows,
        real_sizes=real,
        clusters=dict(clusters.assignment),
        cluster_silhouette=clusters.silhouette,
        dropped_devices=outcome.dropped,
        hostile_device=options.poison,
        quarantined=quarantined,
        release=str(release_dir),
        scale=[
            ScalePoint(
                devices=n,
                uplink_bytes_per_device=up,
                wall_s=outcome.wall_s,
                packets=sum(traffic.packets.values()),
            )
        ],
    )
    results.checks = acceptance_checks(results)
    report = write_report(results, out)
    console.print(console_table(results), width=max(console.width, 160))
    console.print(f"report: {report}")
    if failed:
        raise RuntimeError(f"baselines failed: {', '.join(failed)} (the report has the rest and the errors)")
    return results


def _enroll(folder: Path, federation: str, devices: list[str]) -> dict[str, MqttConfig]:
    """A fresh federation CA and broker setup in `folder`, and every account's MQTT credentials."""
    from deepfusion.cloud.security import SERVICE_ROLES, add_device, init_security, service_mqtt_config

    init_security(folder, federation, force=True)
    accounts = {role.value: service_mqtt_config(folder, role.value) for role in SERVICE_ROLES}
    return accounts | {device: add_device(folder, device) for device in devices}


def _poison_target(tokenizer_dir: Path) -> int:
    """The token a hostile device pushes: the commonest English word, so every test window has it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return int(tokenizer(" the")["input_ids"][0])


def _nll(results: RunResults, method: str, domain: str) -> float | None:
    if not results.has_row(method) or domain not in results.row(method).scores:
        return None
    return results.row(method).scores[domain].nll


def _centralized_gain(results: RunResults, domain: str) -> float | None:
    """G: base minus centralized log-perplexity on `domain` (None when either is missing)."""
    base, centralized = _nll(results, "base", domain), _nll(results, "centralized", domain)
    return None if base is None or centralized is None else base - centralized


def _gain(results: RunResults, method: str, domain: str) -> float | None:
    """`method`'s share of G on `domain`; None when a row lacks it or G <= 0."""
    gain, base, ours = (
        _centralized_gain(results, domain),
        _nll(results, "base", domain),
        _nll(results, method, domain),
    )
    if gain is None or base is None or ours is None or gain <= 0:
        return None
    return (base - ours) / gain


def acceptance_checks(results: RunResults) -> list[Check]:
    """The targets the method is judged by (design: results), measured on this run."""
    checks: list[Check] = []
    for domain in results.domains:
        packets, control = _gain(results, "packets", domain), _gain(results, "public-only", domain)
        gain = _centralized_gain(results, domain)
        if gain is not None and gain <= 0:
            # No gain to share: the two share targets cannot be met, and the report says so.
            checks.append(
                Check(
                    name=f"{domain}: centralized training gains (G > 0)",
                    target="G > 0",
                    measured=f"G = {gain:+.3f}",
                    passed=False,
                )
            )
        if packets is not None:
            checks.append(
                Check(
                    name=f"{domain}: packets recover ≥ 50% of G",
                    target="≥ 50%",
                    measured=f"{packets:.1%}",
                    passed=packets >= 0.5,
                )
            )
        if packets is not None and control is not None:
            beyond = packets - control
            checks.append(
                Check(
                    name=f"{domain}: packets beyond the public-only control",
                    target="≥ 20% of G",
                    measured=f"{beyond:+.1%}",
                    passed=beyond >= 0.2,
                )
            )
        ours = results.row("packets").scores[domain].nll
        for other, what in (
            ("logit-kd", "packets beat logit-only KD"),
            ("packets-alpha0", "VAA beats its α = 0 ablation"),
            ("weight-average", "MoE beats the weight average"),
        ):
            # A baseline that failed has a row with no scores: no check, as for the shares above.
            theirs = _nll(results, other, domain)
            if theirs is not None:
                checks.append(
                    Check(
                        name=f"{domain}: {what}",
                        target="lower log-ppl",
                        measured=f"{ours:.3f} vs {theirs:.3f}",
                        passed=ours < theirs,
                    )
                )
        if results.has_row("oracle") and domain in results.row("oracle").scores:
            gap = ours - results.row("oracle").scores[domain].nll
            checks.append(
                Check(
                    name=f"{domain}: MoE within 0.05 nats of oracle routing",
                    target="≤ +0.05",
                    measured=f"{gap:+.3f}",
                    passed=gap <= 0.05,
                )
            )
    smol = next((r for r in results.real_sizes if r.model.startswith("SmolLM2")), None)
    if smol is not None:
        checks.append(
            Check(
                name="uplink ≤ 10% of the weight upload at SmolLM2-135M size",
                target="≤ 10%",
                measured=f"{smol.packets_over_weights:.1%}",
                passed=smol.packets_over_weights <= 0.10,
            )
        )
        checks.append(
            Check(
                name="uplink ≤ 5% of the FedJETS-style bill at SmolLM2-135M size",
                target="≤ 5%",
                measured=f"{smol.packets_over_fedjets:.1%}",
                passed=smol.packets_over_fedjets <= 0.05,
            )
        )
    return checks
