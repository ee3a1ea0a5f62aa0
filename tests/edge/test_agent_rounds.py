"""The agent's round loop in this process, without a broker: what a round that cannot go as planned does.

The agent scores from a local object store and spools its packets; its status updates and every spooled
packet with its resume cursor are recorded instead of published.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from deepfusion.cloud.shards import publish_shard
from deepfusion.edge import agent as agent_module
from deepfusion.edge.agent import Agent
from deepfusion.edge.agent_config import DeviceConfig
from deepfusion.edge.errors import ErrorCode, ModelError
from deepfusion.shared.fingerprint import tokenizer_fingerprint
from deepfusion.shared.messages import RoundSpec, ShardAssignment, encode_message
from deepfusion.shared.mqtt import Message
from deepfusion.shared.packets import KnowledgePacket, decode
from deepfusion.shared.store import open_store
from deepfusion.shared.topics import round_topic

FED = "fed"
DEVICE = "dev-1"
SHARD = "public-0"
TEXTS = ["A short note.", "word " * 150, "Another one here.", "Third small text.", "x y z " * 60]
LONG = {1, 4}  # sequences of 181+ tokens: each alone is several KiB at top-16, over a 1 KiB budget


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
    assert "scoring failed: RuntimeError: boom" in agent.details
    assert "scoring failed: the runtime ran out of memory" in agent.details
    assert agent.details[-1] == "round scored"
