"""`deepfusion-cloud simulate --quick --secure`: every service a real process over TLS with one account per
device and service and broker ACLs, one device killed mid-round, one device hostile (valid packets,
poisoned knowledge) and quarantined, the release loadable with plain transformers, the report complete."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

pytest.importorskip("torch")

from transformers import AutoModelForCausalLM, AutoTokenizer

from deepfusion.cloud.coordinator import read_state
from deepfusion.cloud.rounds import RoundState
from deepfusion.cloud.sim.results import RunResults
from deepfusion.shared.broker import EmbeddedBroker
from deepfusion.shared.store import open_store
from tests.e2e.simulate import simulate, tail
from tests.fixtures.s3server import S3Server

DROPPED = "fin-01"
HOSTILE = "med-01"
DEVICES = 6  # three per domain: a cluster needs three members to tell the hostile one from the others
EXPECTED_ROWS = {
    "base", "public-only", "centralized", "logit-kd", "paper", "packets", "packets-alpha0", "oracle",
    "weight-average", "undefended",
}  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("results")
    result = simulate(
        *("--quick", "--secure", "--out", str(out), "--devices", str(DEVICES)),
        *("--drop", DROPPED, "--poison", HOSTILE),
        timeout=600,
    )
    return result, out / "quick"


@pytest.mark.slow
@pytest.mark.mqtt
def test_quick_federation_completes_with_a_dropped_and_a_hostile_device(
    run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    result, out = run
    assert result.returncode == 0, tail(result)
    state = RoundState.model_validate_json(
        (out / "store" / "quick" / "rounds" / "0" / "state.json").read_text()
    )
    assert state.status == "closed" and state.close_reason == "deadline"  # closed on its quorum
    assert state.release == "r0"
    stored = {p.parent.name for p in (out / "store" / "quick" / "rounds" / "0" / "knowledge").glob("*/*.dfk")}
    assert stored == set(state.spec.assignments) - {DROPPED}
    assert f"dropped {DROPPED}" in result.stdout

    results = RunResults.model_validate_json((out / "metrics.json").read_text())
    assert results.dropped_devices == [DROPPED]
    assert {r.method for r in results.rows} >= EXPECTED_ROWS | {f"device:{d}" for d in state.spec.assignments}
    for row in results.rows:
        assert set(row.scores) == {"medical", "finance"}, row.method
    # At toy sizes only training on the private text itself is sure to beat the base (the quality
    # claims are tested on the default demo, test_demo.py); this checks the evaluation sees learning.
    centralized, base = results.row("centralized"), results.row("base")
    for domain in ("medical", "finance"):
        assert centralized.scores[domain].nll < base.scores[domain].nll, domain
    packets = results.row("packets")
    assert packets.uplink_bytes_per_device and packets.uplink_bytes_per_device > 0
    assert {b.method for b in results.bills} >= {"packets", "paper", "fedjets", "logit-kd", "centralized"}
    # The packets' features grow with a model's hidden width at real sizes (SmolLM2 576, TinyLlama 2048).
    real = {r.model.split()[0]: r for r in results.real_sizes}
    assert real["TinyLlama"].packet_bytes > real["SmolLM2-135M"].packet_bytes
    report = (out / "report.md").read_text()
    assert DROPPED in report and "DeepFusion (packets" in report
    for plot in ("perplexity_by_round", "bytes_per_device", "clusters"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 5000

    # The hostile device's packets are valid (stored like any other), and only the trainer's screening
    # tells them apart: it quarantines that device alone, and trusting it costs the release.
    assert HOSTILE in stored
    assert set(results.quarantined) == {HOSTILE} and results.hostile_device == HOSTILE
    undefended = results.row("undefended")
    assert undefended.scores["medical"].nll > packets.scores["medical"].nll + 0.1
    assert f"`{HOSTILE}`" in report.split("## Teacher screening")[1]


@pytest.mark.slow
def test_quick_federation_ran_over_tls_with_an_account_per_device(
    run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    result, out = run
    assert result.returncode == 0
    conf = (out / "work" / "mosquitto" / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and "acl_file" in conf and "password_file" in conf
    assert "allow_anonymous true" not in conf
    log = (out / "work" / "mosquitto" / "mosquitto.log").read_text()
    devices = {p.parent.name for p in (out / "work" / "agents").glob("*/device.toml")}
    assert len(devices) == DEVICES
    for account in devices | {"ingest", "coordinator", "trainer", "observer"}:
        assert f"u'{account}')" in log, account  # each connected under its own account
    connects = [line for line in log.splitlines() if "New client connected" in line]
    assert connects and all(" u'" in line and "u'')" not in line for line in connects)  # none anonymous


@pytest.mark.slow
def test_quick_release_loads_with_plain_transformers(
    run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    result, out = run
    assert result.returncode == 0
    release = out / "release"
    moe = AutoModelForCausalLM.from_pretrained(release)
    tokenizer = AutoTokenizer.from_pretrained(release)
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    prompt = tokenizer("The patients were", return_tensors="pt")
    generated = moe.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5
    metrics = json.loads((release / "metrics.json").read_text())
    assert set(metrics["heldout"]) == {"medical", "finance"}


@pytest.mark.slow
@pytest.mark.mqtt
@pytest.mark.s3
def test_two_rounds_run_on_a_given_broker_and_s3_bucket(
    broker: EmbeddedBroker, s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--broker mqtt://...` and `--store s3://...`: the run starts neither a broker nor a local store,
    and every service (ingest, coordinator, trainer, the devices' shard downloads) works on them, for
    two rounds: the second opens after the first's release, and its students start from the first's."""
    uri = f"s3://{s3_server.bucket}/sim-{uuid.uuid4().hex[:8]}"
    for name, value in {**s3_server.env(), "AWS_ENDPOINT_URL": s3_server.endpoint_url}.items():
        monkeypatch.setenv(name, value)  # for the run and for this test's own reads
    result = simulate(
        *("--quick", "--no-baselines", "--devices", "4", "--set", "rounds=2", "--out", str(tmp_path)),
        *("--broker", f"mqtt://{broker.host}:{broker.port}", "--store", uri),
        timeout=900,
    )
    assert result.returncode == 0, tail(result)
    out = tmp_path / "quick"
    assert not (out / "store").exists() and not (out / "work" / "mosquitto").exists()
    store = open_store(uri)
    for round_id in (0, 1):
        state = read_state(store, "quick", round_id)
        assert state is not None and state.status == "closed" and state.release == f"r{round_id}"
        stored = [key for key in store.list(f"quick/rounds/{round_id}/knowledge/") if key.endswith(".dfk")]
        assert {key.split("/")[-2] for key in stored} == set(state.spec.assignments), round_id
        assert len(state.spec.assignments) == 4
        assert store.exists(f"quick/releases/r{round_id}/model/config.json")
        assert store.list(f"quick/rounds/{round_id}/students/")
    assert (out / "release" / "config.json").is_file()  # the last release, fetched from the bucket
    warm = "round 1: students start from {0: 'previous', 1: 'previous'}"
    assert warm in (out / "logs" / "trainer-r1.log").read_text()
    results = RunResults.model_validate_json((out / "metrics.json").read_text())
    assert {r.round for r in results.rounds if r.method == "packets"} == {0, 1}


def test_simulate_refuses_an_unknown_device_to_drop(tmp_path: Path) -> None:
    result = simulate("--quick", "--out", str(tmp_path), "--drop", "nobody", timeout=120)
    assert result.returncode == 1 and "no such device" in result.stdout


def test_simulate_refuses_a_bad_profile_key(tmp_path: Path) -> None:
    result = simulate("--quick", "--set", "student.stepz=3", timeout=60)
    assert result.returncode == 2 and "stepz" in result.stdout
