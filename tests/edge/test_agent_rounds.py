"""The agent's round loop in this process, without a broker: what a round that cannot go as planned does.

The agent scores from a local object store and spools its packets; its status updates and every spooled
packet with its resume cursor are recorded instead of published. The uplink, the RoundSpec handler and
the checks of the setup run without a model, the uplink with a client that records what it publishes.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest.mock import Mock

import pytest

from deepfusion.cloud.shards import publish_shard
from deepfusion.edge import agent as agent_module
from deepfusion.edge import spool as spool_module
from deepfusion.edge.agent import Agent
from deepfusion.edge.agent_config import DeviceConfig, load_device_config
from deepfusion.edge.errors import ErrorCode, ModelError
from deepfusion.shared.config import ConfigError
from deepfusion.shared.fingerprint import tokenizer_fingerprint
from deepfusion.shared.messages import (
    DeviceStatus,
    RoundSpec,
    ShardAssignment,
    ShardRef,
    decode_message,
    encode_message,
)
from deepfusion.shared.mqtt import Message
from deepfusion.shared.packets import KnowledgePacket, decode
from deepfusion.shared.store import open_store
from deepfusion.shared.topics import knowledge_topic, round_topic, status_topic

FED = "fed"
DEVICE = "dev-1"
SHARD = "public-0"
TEXTS = ["A short note.", "word " * 150, "Another one here.", "Third small text.", "x y z " * 60]
LONG = {1, 4}  # sequences of 181+ tokens: each alone is several KiB at top-16, over a 1 KiB budget


def _whole_shard_round(round_id: int, tokenizer: str = "0" * 64, **fields: Any) -> RoundSpec:
    """A RoundSpec giving DEVICE the whole shard (its URL is never fetched: tests stub `fetch_shard`)."""
    ref = ShardRef(shard=SHARD, url="file:///nowhere", sha256="0" * 64, sequences=len(TEXTS))
    return RoundSpec(
        federation=FED,
        round=round_id,
        tokenizer=tokenizer,
        shards=[ref],
        assignments={DEVICE: [ShardAssignment(shard=SHARD, start=0, stop=len(TEXTS))]},
        **{
            "top_k": 16,
            "stages": 0,
            "patches": 2,
            "deadline": datetime.now(UTC) + timedelta(hours=1),
            **fields,
        },
    )


class Flaky:
    """A backend whose first `score` calls raise the given errors."""

    def __init__(self, backend: Any, errors: list[Exception]) -> None:
        self.backend, self.errors = backend, errors

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def score(self, *args: Any, **kwargs: Any) -> Any:
        if self.errors:
            raise self.errors.pop(0)
        return self.backend.score(*args, **kwargs)


class LocalAgent(Agent):
    """An agent without MQTT that records its status details and spooled (packet, cursor) pairs."""

    def __init__(self, config: DeviceConfig, model: Path) -> None:
        from deepfusion.edge.backends import load_backend
        from deepfusion.edge.modelinfo import load_tokenizer

        super().__init__(config)
        self.tokenizer = load_tokenizer(model)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer.get_vocab(with_added_tokens=True))
        self.backend = load_backend("torch", model, threads=1)
        self.details: list[str] = []
        self.spooled: list[tuple[KnowledgePacket, int]] = []

    def _publish_status(self, *, force: bool = False, **changes: Any) -> None:
        if "detail" in changes:
            self.details.append(changes["detail"])
        super()._publish_status(force=force, **changes)

    def _spool(self, data: bytes, round_id: int, cursor: tuple[str, int], *args: Any) -> None:
        super()._spool(data, round_id, cursor, *args)
        self.spooled.append((decode(data), cursor[1]))

    def open_round(self, root: Path, **settings: Any) -> RoundSpec:
        """Publish the shard and hand the agent a RoundSpec as if it came from the broker."""
        ref = publish_shard(open_store(str(root / "store")), FED, SHARD, TEXTS)
        spec = RoundSpec(
            federation=FED,
            round=1,
            tokenizer=self.fingerprint,
            shards=[ref],
            assignments={DEVICE: [ShardAssignment(shard=SHARD, start=0, stop=len(TEXTS))]},
            deadline=datetime.now(UTC) + timedelta(hours=1),
            **{"top_k": 16, "stages": 0, "patches": 2, "max_tokens": 256, **settings},
        )
        self._on_round(Message(round_topic(FED), encode_message(spec), qos=1, retain=True))
        return spec

    def packed_ids(self) -> list[int]:
        return [int(i) for packet, _ in self.spooled for i in packet.sequence_ids]


@pytest.fixture
def make_agent(tmp_path: Path, random_models: dict[str, Path]) -> Any:
    started: list[LocalAgent] = []

    def make() -> LocalAgent:
        model = random_models["tiny-gpt2"]  # 3 layers
        config = DeviceConfig.model_validate(
            {
                "device": {"id": DEVICE, "federation": FED, "state_dir": str(tmp_path / "state")},
                "model": {"path": str(model), "threads": 1, "batch_size": 2},
                "spool": {"dir": str(tmp_path / "spool")},
            }
        )
        started.append(LocalAgent(config, model))
        return started[-1]

    yield make
    for agent in started:
        agent.backend.close()


def _run_rounds(agent: LocalAgent, until: Any, timeout: float = 60.0) -> None:
    """Run the round loop on a thread until `until()` holds; any error it raises fails the test."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            agent._rounds(stop)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not until() and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(30)
    assert not errors, errors
    assert until(), "the round loop did not get there"


def _round_done(agent: LocalAgent, spec: RoundSpec) -> bool:
    return agent.spool.cursor(f"{spec.round}/{SHARD}/0") == len(TEXTS)


def test_a_round_with_more_stages_than_layers_gives_valid_packets(make_agent: Any, tmp_path: Path) -> None:
    agent = make_agent()
    spec = agent.open_round(tmp_path, stages=4, top_k=8, max_tokens=32)
    _run_rounds(agent, lambda: _round_done(agent, spec))
    packets = [decode(agent.spool.read(entry.digest)) for entry in agent.spool.pending()]
    assert sorted(int(i) for packet in packets for i in packet.sequence_ids) == list(range(len(TEXTS)))
    for packet in packets:
        assert packet.header.stages == 4 and packet.header.feature_stages == (1, 2, 3)
        for sequence in packet.sequences():
            assert sequence.features is not None and sequence.features.shape == (3, 2, 128)


def test_a_model_of_a_shorter_context_than_the_rounds_windows_scores_their_prefixes(
    tmp_path: Path, random_models: dict[str, Path]
) -> None:
    """GPT-2's learned positions end at n_positions: windows of the round's length failed every batch, and
    the round was retried for ever. The agent scores each sequence's longest prefix the model takes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tmp_path / "short-gpt2"
    short = AutoModelForCausalLM.from_pretrained(random_models["tiny-gpt2"])
    short.config.n_positions = 16
    short.transformer.wpe.weight.data = short.transformer.wpe.weight.data[:16].clone()
    short.save_pretrained(model)
    AutoTokenizer.from_pretrained(random_models["tiny-gpt2"]).save_pretrained(model)
    config = DeviceConfig.model_validate(
        {
            "device": {"id": DEVICE, "federation": FED, "state_dir": str(tmp_path / "state")},
            "model": {"path": str(model), "threads": 1, "batch_size": 2},
            "spool": {"dir": str(tmp_path / "spool")},
        }
    )
    agent = LocalAgent(config, model)
    try:
        spec = agent.open_round(tmp_path, max_tokens=48)
        _run_rounds(agent, lambda: _round_done(agent, spec))
    finally:
        agent.backend.close()
    assert sorted(agent.packed_ids()) == list(range(len(TEXTS)))
    lengths = [len(s.token_ids) for packet, _ in agent.spooled for s in packet.sequences()]
    assert max(lengths) == 16


def test_an_oversized_sequence_is_logged_and_nothing_else_is_lost(
    make_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    agent = make_agent()
    spec = agent.open_round(tmp_path, packet_budget=1024)
    with caplog.at_level(logging.ERROR, logger="deepfusion.edge.agent"):
        _run_rounds(agent, lambda: _round_done(agent, spec))
    assert sorted(agent.packed_ids()) == sorted(set(range(len(TEXTS))) - LONG)
    packed: set[int] = set()
    for packet, cursor in agent.spooled:  # a resume at any packet's cursor skips only what is too large
        packed |= {int(i) for i in packet.sequence_ids}
        assert set(range(cursor)) - LONG <= packed
    logged = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(logged) == 2
    for sequence, line in zip(sorted(LONG), logged, strict=True):
        assert f"sequence {sequence} alone encodes to" in line and "packet budget of 1024" in line


def test_the_round_loop_survives_scoring_failures_and_retries(
    make_agent: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_module, "RETRY_MIN_S", 0.05)
    agent = make_agent()
    model_error = ModelError(ErrorCode.BAD_INPUT, "the runtime ran out of memory", "use fewer threads")
    agent.backend = Flaky(agent.backend, [RuntimeError("boom"), model_error])
    spec = agent.open_round(tmp_path, top_k=8, max_tokens=32)
    with caplog.at_level(logging.ERROR, logger="deepfusion.edge.agent"):
        _run_rounds(agent, lambda: _round_done(agent, spec))
    assert sorted(agent.packed_ids()) == list(range(len(TEXTS)))  # the third try scored the round
    failures = [r for r in caplog.records if "scoring failed" in r.getMessage()]
    assert len(failures) == 2
    assert failures[0].exc_info is not None  # an unexpected error comes with its traceback
    assert failures[1].exc_info is None and "ran out of memory" in failures[1].getMessage()
    # In this order; the loop may say more (idle) before it sees the stop.
    boom = agent.details.index("scoring failed: RuntimeError: boom")
    memory = agent.details.index("scoring failed: the runtime ran out of memory")
    assert boom < memory < agent.details.index("round scored", memory)


class _Published:
    def is_published(self) -> bool:
        return True


class RecordingClient:
    """Stands in for the MQTT client: connected, records what is published."""

    connected = True

    def __init__(self) -> None:
        self.topics: list[str] = []
        self.payloads: list[bytes] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> _Published:
        self.topics.append(topic)
        self.payloads.append(payload)
        return _Published()

    def details(self) -> list[str]:
        """The `detail` of every status published, in order."""
        return [
            decode_message(DeviceStatus, payload).detail
            for topic, payload in zip(self.topics, self.payloads, strict=True)
            if topic == status_topic(FED, DEVICE)
        ]


def _config(tmp_path: Path, spool: Path) -> DeviceConfig:
    """A device config whose model is never loaded."""
    return DeviceConfig.model_validate(
        {
            "device": {"id": DEVICE, "federation": FED, "state_dir": str(tmp_path / "state")},
            "model": {"path": str(tmp_path / "model")},
            "spool": {"dir": str(spool)},
        }
    )


def test_an_unusable_spool_dir_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"spool\.dir .*file/spool cannot be used"):
        Agent(_config(tmp_path, tmp_path / "file" / "spool"))


def test_the_uplink_outlives_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    agent = Agent(_config(tmp_path, tmp_path / "spool"))
    client = RecordingClient()
    agent._client = client  # type: ignore[assignment]
    knowledge = knowledge_topic(FED, DEVICE)
    acked = agent.spool.add(b"a" * 100, round=1)
    uplink = threading.Thread(target=agent._uplink, daemon=True)
    uplink.start()
    try:
        deadline = time.monotonic() + 10
        while knowledge not in client.topics and time.monotonic() < deadline:
            time.sleep(0.02)
        full = OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(spool_module, "_write_durably", Mock(side_effect=full))
        with caplog.at_level(logging.WARNING, logger="deepfusion.edge.agent"):
            agent.spool.ack(acked, flush=False)  # the uplink writes it to the index: the disk is full
            time.sleep(2 * agent_module.ACK_FLUSH_S)
        assert uplink.is_alive() and "cannot write the spool index" in caplog.text
        monkeypatch.undo()
        agent.spool.add(b"b" * 100, round=1)  # room again: the next packet still goes out
        while client.topics.count(knowledge) < 2 and time.monotonic() < deadline + 5:
            time.sleep(0.02)
        assert client.topics.count(knowledge) == 2
    finally:
        agent._closing.set()
        uplink.join(10)
    assert not uplink.is_alive() and not (tmp_path / "spool" / "packets" / f"{acked}.dfk").exists()


class _Queued:
    """A QoS 1 publish that the broker confirms only when the test says so."""

    def __init__(self) -> None:
        self.confirmed = threading.Event()

    def is_published(self) -> bool:
        return self.confirmed.is_set()

    def wait_for_publish(self, timeout: float) -> None:
        self.confirmed.wait(timeout)


class SlowLink(RecordingClient):
    """A link that takes its time: nothing published is confirmed until `confirm()`."""

    def __init__(self) -> None:
        super().__init__()
        self.queued: list[_Queued] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> _Queued:  # type: ignore[override]
        super().publish(topic, payload, qos, retain)
        self.queued.append(_Queued())
        return self.queued[-1]

    def confirm(self) -> None:
        for info in self.queued:
            info.confirmed.set()

    def packets(self) -> list[bytes]:
        topic = knowledge_topic(FED, DEVICE)
        return [p for t, p in zip(self.topics, self.payloads, strict=True) if t == topic]


def test_a_slow_link_gets_each_packet_once_until_the_broker_has_it(tmp_path: Path) -> None:
    """A packet still queued in MQTT is not queued again, however late its Ack; only a window is queued."""
    config = _config(tmp_path, tmp_path / "spool")
    agent = Agent(config.model_copy(update={"spool": config.spool.model_copy(update={"resend_s": 0.1})}))
    client = SlowLink()
    agent._client = client  # type: ignore[assignment]
    spooled = [agent.spool.add(bytes([i]) * 100, round=1) for i in range(agent_module.UPLINK_WINDOW + 8)]
    uplink = threading.Thread(target=agent._uplink, daemon=True)
    uplink.start()
    try:
        time.sleep(1.0)  # ten times resend_s without a single PUBACK
        assert client.packets() == [agent.spool.read(d) for d in spooled[: agent_module.UPLINK_WINDOW]]
        client.confirm()  # the broker has them; their Acks stay late, so they go again with the rest
        deadline = time.monotonic() + 10
        while len(set(client.packets())) < len(spooled) and time.monotonic() < deadline:
            client.confirm()
            time.sleep(0.02)
        assert len(set(client.packets())) == len(spooled)
        assert len(client.packets()) > len(spooled)  # a confirmed packet without its Ack is resent
    finally:
        agent._closing.set()
        uplink.join(10)
    assert not uplink.is_alive()


def test_the_status_leaves_spool_full_when_scoring_resumes(tmp_path: Path) -> None:
    config = _config(tmp_path, tmp_path / "spool")
    agent = Agent(config.model_copy(update={"spool": config.spool.model_copy(update={"max_bytes": 1024})}))
    client = RecordingClient()
    agent._client = client  # type: ignore[assignment]
    first = agent.spool.add(b"a" * 1000, round=1)
    stop = threading.Event()
    writer = threading.Thread(target=agent._spool, args=(b"b" * 1000, 1, ("1/s/0", 2), stop, 0))
    writer.start()
    deadline = time.monotonic() + 10
    while "spool full: waiting for acks" not in client.details() and time.monotonic() < deadline:
        time.sleep(0.02)
    agent.spool.ack(first)
    writer.join(10)
    assert not writer.is_alive() and len(agent.spool) == 1
    assert client.details()[-1] != "spool full: waiting for acks"


def test_an_older_round_delivered_late_keeps_the_current_one(tmp_path: Path) -> None:
    agent = Agent(_config(tmp_path, tmp_path / "spool"))
    now = datetime.now(UTC)

    def spec(round_id: int, opened_at: datetime) -> RoundSpec:
        return _whole_shard_round(round_id, deadline=opened_at + timedelta(hours=1), opened_at=opened_at)

    def deliver(message: RoundSpec) -> None:
        agent._on_round(Message(round_topic(FED), encode_message(message), qos=1, retain=True))

    current = spec(6, now)
    deliver(current)
    deliver(spec(5, now - timedelta(hours=2)))  # redelivered after round 6 arrived
    assert agent._spec == current and agent._generation == 1
    reset = spec(1, now + timedelta(minutes=1))  # a federation started over counts rounds from 1 again
    deliver(reset)
    assert agent._spec == reset and agent._generation == 2


def test_a_round_the_deadline_cuts_or_misses_is_not_reported_scored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    agent = Agent(_config(tmp_path, tmp_path / "spool"))
    agent.fingerprint = "0" * 64

    def spec(deadline: datetime) -> RoundSpec:
        return _whole_shard_round(3, agent.fingerprint, deadline=deadline)

    def score_past_the_deadline(spec: RoundSpec, *args: Any) -> int:
        time.sleep(max(0.0, (spec.deadline - datetime.now(UTC)).total_seconds()) + 0.05)
        return 2  # the deadline came after two sequences

    monkeypatch.setattr(agent_module, "fetch_shard", lambda *args: TEXTS)
    monkeypatch.setattr(agent, "_score_assignment", score_past_the_deadline)
    with caplog.at_level(logging.INFO, logger="deepfusion.edge.agent"):
        agent._score_round(spec(datetime.now(UTC) + timedelta(seconds=0.2)), 1, threading.Event())
    assert agent._status["detail"] == "deadline passed" and agent._status["sequences_done"] == 2
    assert "round 3 scored=False sequences=2/5" in caplog.text

    agent._score_round(spec(datetime.now(UTC) - timedelta(seconds=1)), 2, threading.Event())
    assert agent._status["detail"] == "deadline passed" and agent._status["state"] == "online"


def test_a_round_opened_again_under_the_same_id_is_scored_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A federation that starts over counts rounds from 1 again: old cursors must not skip the new round."""
    agent = Agent(_config(tmp_path, tmp_path / "spool"))
    agent.fingerprint = "0" * 64
    now = datetime.now(UTC)

    def spec(opened_at: datetime) -> RoundSpec:
        return _whole_shard_round(
            1, agent.fingerprint, deadline=now + timedelta(hours=1), opened_at=opened_at
        )

    begins: list[int] = []

    def score(spec: RoundSpec, generation: int, assignment: ShardAssignment, texts: Any, begin: int,
              stop_at: int, done: int, stop: Any) -> int:  # fmt: skip
        begins.append(begin)
        agent.spool.set_cursor(agent._cursor_key(spec, assignment), stop_at)
        return done + stop_at - begin

    monkeypatch.setattr(agent_module, "fetch_shard", lambda *args: TEXTS)
    monkeypatch.setattr(agent, "_score_assignment", score)
    first = spec(now - timedelta(minutes=5))
    agent._score_round(first, 1, threading.Event())
    agent._score_round(first, 2, threading.Event())  # the same opening again (a restart): nothing left
    assert begins == [0]
    agent._score_round(spec(now), 3, threading.Event())
    assert begins == [0, 0]


def test_a_private_corpus_without_text_is_a_config_error(tmp_path: Path) -> None:
    private = tmp_path / "private.jsonl"
    private.write_text('{"text": "  "}\n\n')
    config = _config(tmp_path, tmp_path / "spool")
    agent = Agent(config.model_copy(update={"data": config.data.model_copy(update={"private": private})}))
    with pytest.raises(ConfigError, match="holds no text"):
        agent._embedding()


def test_an_embedding_outside_int8_is_a_config_error(tmp_path: Path) -> None:
    """Caught with the config, not by the DeviceCard at join, after the model has loaded."""
    values = ",".join(["200"] + ["0"] * 31)
    overrides = [
        f"device.id={DEVICE}",
        f"device.federation={FED}",
        "model.path=m",
        f"data.embedding=[{values}]",
    ]
    with pytest.raises(ConfigError, match=r"data\.embedding\.0: Input should be less than or equal to 127"):
        load_device_config(None, overrides)


def test_an_unknown_log_level_is_refused(tmp_path: Path) -> None:
    """`--log-level loud` used to run at info without a word."""
    from typer.testing import CliRunner

    from deepfusion.edge.cli import app

    args = ["run", "-c", str(tmp_path / "device.toml"), "--log-level"]
    result = CliRunner().invoke(app, [*args, "loud"])
    assert result.exit_code == 2
    assert "Invalid value for '--log-level'" in result.output and "'loud' is not one of" in result.output
    known = CliRunner().invoke(app, [*args, "WARNING"])  # any case, as before; then the config is read
    assert known.exit_code == 2 and "does not exist" in known.output, known.output
