"""`deepfusion-edge run`: the device agent, a long-running member of a federation (design sections 3, 4, 7).

    Agent(load_device_config("device.toml")).run(stop_event)

What it does, in order:

1. Joins: loads the model and its tokenizer, computes (or reads from its cache) the data embedding e_n of
   the private corpus, connects with a Last Will that marks it offline, and publishes its retained
   `DeviceCard` and `DeviceStatus`.
2. Follows the retained `RoundSpec`. For each assignment of this device: fetches the shard (sha256
   checked), scores sequences [start, stop) in batches (sequence i is line i of the shard, cut to the
   round's `max_tokens`), packs them into packets within the round's byte budget and writes each packet
   to the spool before anything is published. A new RoundSpec cancels the stale round between batches;
   a passed deadline ends it. A round whose scoring fails is logged, shown in the status and tried
   again later; the agent itself keeps running.
3. Uplink (its own thread): publishes every spooled packet with QoS 1 at the configured byte rate, at
   most `UPLINK_WINDOW` of them not yet confirmed by the broker, and publishes it again whenever its
   Ack is late (never while MQTT still holds a copy); an accepted Ack removes it from the spool, a
   rejected one is logged and dropped. After a crash, reboot or broker outage the spool still holds
   what was not acknowledged, and the scoring cursor stored with each packet says where to resume.
4. On SIGTERM: finishes the current batch, spools what it holds, marks itself offline and exits.

Packets equal `deepfusion-edge score` on the same texts: the same windows, backend batches, packet
builder and encoder, so equal inputs give byte-identical packets.
"""

from __future__ import annotations

import logging
import platform
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import typer

from deepfusion.edge import __version__
from deepfusion.edge.agent_config import DeviceConfig, load_device_config
from deepfusion.edge.errors import ModelError
from deepfusion.edge.fetch import FetchError, fetch_shard
from deepfusion.edge.scoring import Window, batched, packet_header, read_texts, to_knowledge, windows
from deepfusion.edge.spool import Spool, SpoolFull
from deepfusion.shared.config import ConfigError
from deepfusion.shared.fingerprint import tokenizer_fingerprint
from deepfusion.shared.messages import (
    Ack,
    DeviceCard,
    DeviceState,
    DeviceStatus,
    MessageError,
    RoundSpec,
    ShardAssignment,
    ShardRef,
    decode_message,
    encode_message,
)
from deepfusion.shared.mqtt import Message, MqttClient, MqttError, Will
from deepfusion.shared.packets import PacketBuilder, PacketHeader
from deepfusion.shared.topics import ack_topic, card_topic, knowledge_topic, round_topic, status_topic

__all__ = ["Agent", "RateLimiter", "run"]

log = logging.getLogger(__name__)

_LOAD_LOCK = threading.Lock()  # agents hosted in one process load their models in turn
ACK_FLUSH_S = 1.0  # how long an Ack may wait to be written to the spool index (a crash resends it)
RETRY_MIN_S = 10.0  # wait after a round's scoring failed; it doubles with each failure of that round
RETRY_MAX_S = 600.0
UPLINK_WINDOW = 32  # packets handed to MQTT that the broker has not confirmed yet


class RateLimiter:
    """Token bucket in bytes per second (0: unlimited); one second of burst."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._tokens = float(rate)
        self._last = time.monotonic()

    def acquire(self, size: int, stop: threading.Event) -> bool:
        """Wait until `size` bytes may go out; False when `stop` was set meanwhile."""
        if self.rate <= 0:
            return True
        while True:
            now = time.monotonic()
            self._tokens = min(float(self.rate), self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= min(size, self.rate):  # a packet larger than the burst goes at a full bucket
                self._tokens -= size
                return True
            if stop.wait((min(size, self.rate) - self._tokens) / self.rate):
                return False


class _Cancelled(Exception):
    """The round being scored is no longer current."""


class _SpoolWriter:
    """Spools packets in order on a thread of its own, so the spool's fsyncs overlap the next batch.

    At most `depth` packets wait; `put` blocks beyond that. After a failed write the rest is skipped and
    the error is raised by the next `put` or by `close`, which waits until every queued packet is spooled.
    """

    def __init__(self, write: Callable[[bytes, tuple[str, int]], None], depth: int = 4) -> None:
        self._write = write
        self._queue: queue.Queue[tuple[bytes, tuple[str, int]] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(*item)
                except BaseException as exc:  # handed to the scoring thread
                    self._error = exc

    def put(self, data: bytes, cursor: tuple[str, int]) -> None:
        self._check()
        self._queue.put((data, cursor))  # the writer keeps draining even after an error: no deadlock

    def close(self, *, check: bool = True) -> None:
        self._queue.put(None)
        self._thread.join()
        if check:
            self._check()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error


def _parameters_estimate(layers: int, hidden: int, vocab: int) -> int:
    """Parameters of a decoder when its files do not say (GGUF): 12 L H^2 + V H."""
    return max(1, 12 * layers * hidden * hidden + vocab * hidden)


class Agent:
    """One device of a federation. `run(stop)` blocks until `stop` is set."""

    def __init__(self, config: DeviceConfig) -> None:
        self.config = config
        self.device = config.device.id
        self.federation = config.device.federation
        try:
            self.spool = Spool(config.spool.dir, config.spool.max_bytes)
        except OSError as exc:  # not writable, not a folder, a full disk: a setup problem, not a crash
            raise ConfigError(f"spool.dir {config.spool.dir} cannot be used: {exc}") from None
        self._client: MqttClient | None = None
        self._cond = threading.Condition()
        self._spec: RoundSpec | None = None
        self._generation = 0
        self._closing = threading.Event()  # uplink and waits stop
        self._status: dict[str, Any] = {"state": DeviceState.ONLINE}
        self._status_sent = 0.0
        self._full_warned = False
        self._flush_failed = False  # the last index write of the Acks failed (logged once)
        self.backend: Any = None

    # -- lifecycle -------------------------------------------------------------------------------------

    def load_backend(self, name: str, path: Any) -> Any:
        """The scoring backend `name` on the model at `path` (a subclass may wrap it)."""
        from deepfusion.edge.backends import load_backend

        return load_backend(name, path, threads=self.config.model.threads)

    def run(self, stop: threading.Event) -> None:
        from deepfusion.edge.modelinfo import load_tokenizer, model_info

        cfg = self.config
        with _LOAD_LOCK:  # one at a time: transformers' loading patches process-wide state
            info = model_info(cfg.model.path)
            name = cfg.model.backend if cfg.model.backend != "auto" else info.backends[0]
            self.tokenizer = load_tokenizer(info.path)
            self.fingerprint = tokenizer_fingerprint(self.tokenizer.get_vocab(with_added_tokens=True))
            self.backend = self.load_backend(name, info.path)
        self.model_name = Path(info.path).name
        try:
            card = self._card(info, name)
            will = Will(
                status_topic(self.federation, self.device), encode_message(self._status_message("offline"))
            )
            client = MqttClient(cfg.mqtt, self.device, will=will, clean_start=False)
            self._client = client
            client.subscribe(ack_topic(self.federation, self.device), self._on_ack)
            client.subscribe(round_topic(self.federation), self._on_round)
            if not self._connect(client, stop):
                return
            client.publish(card_topic(self.federation, self.device), encode_message(card), retain=True)
            self._publish_status(force=True)
            log.info(
                "agent joined device=%s federation=%s backend=%s model=%s spooled=%d",
                self.device,
                self.federation,
                name,
                self.model_name,
                len(self.spool),
            )
            uplink = threading.Thread(target=self._uplink, name="uplink", daemon=True)
            uplink.start()
            try:
                self._rounds(stop)
            finally:
                self._closing.set()
                uplink.join(timeout=30)
                self._flush_acks()
                self._say_offline(client)
                client.close()
        finally:
            self.backend.close()
            log.info("agent stopped device=%s unacked=%d", self.device, len(self.spool))

    def _connect(self, client: MqttClient, stop: threading.Event) -> bool:
        """Connect, retrying with jittered exponential backoff while the broker is unreachable."""
        delay = self.config.mqtt.reconnect_min_s
        while not stop.is_set():
            try:
                client.connect(timeout=10)
                return True
            except MqttError as exc:
                wait = delay * (1 + np.random.default_rng().random())
                log.warning("agent cannot connect: %s; retrying in %.1f s", exc, wait)
                stop.wait(wait)
                delay = min(delay * 2, self.config.mqtt.reconnect_max_s)
        return False

    def _say_offline(self, client: MqttClient) -> None:
        """A clean disconnect discards the Last Will, so say it ourselves."""
        try:
            client.publish_and_wait(
                status_topic(self.federation, self.device),
                encode_message(self._status_message("offline")),
                retain=True,
                timeout=5,
            )
        except MqttError as exc:
            log.warning("could not publish the offline status: %s", exc)

    # -- joining ---------------------------------------------------------------------------------------

    def _card(self, info: Any, backend: str) -> DeviceCard:
        shape = self.backend.shape
        stages = self.config.model.stages
        return DeviceCard(
            federation=self.federation,
            device=self.device,
            model_family=shape.architecture,
            model_params=info.parameters
            or _parameters_estimate(shape.num_layers, shape.hidden_size, shape.vocab_size),
            tokenizer=self.fingerprint,
            vocab_size=shape.vocab_size,
            backend=backend,
            hardware=self.config.device.hardware or f"{platform.machine()} {platform.system()}".strip(),
            stages=stages,
            feature_width=shape.hidden_size if stages else 0,
            embedding=self._embedding(),
            software=__version__,
        )

    def _embedding(self) -> list[int]:
        data = self.config.data
        if data.embedding is not None:
            return list(data.embedding)
        if data.private is None:
            raise ConfigError("set data.private (the private corpus) or data.embedding (a precomputed e_n)")
        from deepfusion.edge.embed import EmbeddingUnavailable, data_embedding

        texts = list(read_texts(data.private))
        if not any(text.strip() for text in texts):
            raise ConfigError(f"data.private {data.private} holds no text to compute the data embedding from")
        started = time.perf_counter()
        try:
            with _LOAD_LOCK:  # MiniLM loads through transformers too (see `run`)
                values = data_embedding(
                    texts,
                    max_texts=data.embedding_max_texts,
                    cache_dir=self.config.device.state_dir / "embeddings",
                )
        except EmbeddingUnavailable as exc:
            raise ConfigError(f"{exc}; or set data.embedding to a precomputed e_n") from None
        log.info("data embedding ready seconds=%.2f", time.perf_counter() - started)
        return values

    # -- status ----------------------------------------------------------------------------------------

    def _status_message(self, state: str | None = None, **changes: Any) -> DeviceStatus:
        self._status.update(changes)
        fields = {**self._status, "state": state or self._status["state"]}
        return DeviceStatus(
            federation=self.federation,
            device=self.device,
            model=getattr(self, "model_name", ""),
            backend=getattr(self.backend, "name", None),
            software=__version__,
            packets_unacked=len(self.spool),
            **fields,
        )

    def _publish_status(self, *, force: bool = False, **changes: Any) -> None:
        now = time.monotonic()
        client = self._client
        if client is None or not (force or now - self._status_sent >= self.config.uplink.status_interval_s):
            self._status.update(changes)  # sent with the next status
            return
        message = self._status_message(**changes)
        self._status_sent = now
        try:
            client.publish(status_topic(self.federation, self.device), encode_message(message), retain=True)
        except MqttError as exc:
            log.debug("status not published: %s", exc)

    # -- MQTT handlers (network thread) ----------------------------------------------------------------

    def _on_round(self, message: Message) -> None:
        if not message.payload:
            return  # the retained round was cleared
        try:
            spec = decode_message(RoundSpec, message.payload)
        except MessageError as exc:
            log.error("ignored an invalid RoundSpec: %s", exc)
            return
        with self._cond:
            current = self._spec
            if current is not None and (current.round, current.opened_at) == (spec.round, spec.opened_at):
                # The retained copy again after a reconnect, or the round re-announced with freshly
                # presigned shard URLs: keep the work going, fetch with the newest URLs.
                self._spec = spec
                return
            if current is not None and spec.round < current.round and spec.opened_at < current.opened_at:
                # An older round handed over late (a QoS 1 redelivery after a reconnect, or a persistent
                # session's queue): following it would cancel the current round and drop its cursors.
                log.info("ignored the RoundSpec of round %d: round %d is newer", spec.round, current.round)
                return
            self._spec = spec
            self._generation += 1
            self._cond.notify_all()
        log.info(
            "round received round=%d assignments=%d", spec.round, len(spec.assignments.get(self.device, []))
        )

    def _on_ack(self, message: Message) -> None:
        try:
            ack = decode_message(Ack, message.payload)
        except MessageError as exc:
            log.error("ignored an invalid Ack: %s", exc)
            return
        # Not on disk at once: the uplink thread writes the spool index for many Acks together.
        if ack.accepted:
            if self.spool.ack(ack.packet, flush=False):
                log.debug("packet acked packet=%s duplicate=%s", ack.packet[:12], ack.duplicate)
        else:
            reason = ack.reason.value if ack.reason is not None else "unknown"
            self.spool.reject(ack.packet, reason, ack.detail, flush=False)

    # -- uplink thread ---------------------------------------------------------------------------------

    def _uplink(self) -> None:
        client = self._client
        assert client is not None
        topic = knowledge_topic(self.federation, self.device)
        limiter = RateLimiter(self.config.uplink.rate_limit_bytes_s)
        resend_s = self.config.spool.resend_s
        sent: dict[str, tuple[float, Any]] = {}  # digest -> (when, paho's message info)
        flushed = time.monotonic()
        while not self._closing.is_set():
            # A window of unconfirmed publishes: a slow link must not queue the whole spool in memory,
            # where a packet would wait longer than `resend_s` and so be queued again and again.
            unconfirmed = [info for _, info in sent.values() if not info.is_published()]
            if client.connected:
                for entry in self.spool.pending():
                    if self._closing.is_set() or not client.connected or len(unconfirmed) >= UPLINK_WINDOW:
                        break
                    last = sent.get(entry.digest)
                    if last is not None:
                        if not last[1].is_published():
                            continue  # paho sends it until the broker confirms it, again after a reconnect
                        age = time.monotonic() - last[0]
                        if age < resend_s:
                            continue
                        log.info("resending unacked packet=%s age=%.1fs", entry.digest[:12], age)
                    try:
                        data = self.spool.read(entry.digest)
                    except KeyError:
                        continue  # acknowledged meanwhile
                    if not limiter.acquire(len(data) + len(topic), self._closing):
                        break
                    try:
                        info = client.publish(topic, data, qos=1)
                    except MqttError as exc:
                        log.warning("publish failed: %s", exc)
                        break
                    sent[entry.digest] = (time.monotonic(), info)
                    unconfirmed.append(info)
                live = {e.digest for e in self.spool.pending()}
                for digest in [d for d in sent if d not in live]:
                    del sent[digest]
            self._publish_status()
            if time.monotonic() - flushed >= ACK_FLUSH_S:
                flushed = time.monotonic()
                self._flush_acks()
            if len(unconfirmed) >= UPLINK_WINDOW:
                unconfirmed[0].wait_for_publish(min(0.5, resend_s / 4))  # a confirmation makes room
            else:
                self.spool.wait_for_change(min(0.5, resend_s / 4))
        self._flush_acks()

    def _flush_acks(self) -> None:
        """Write the Acks received to the spool index; a failed write (a full disk) is logged, not raised.

        The uplink must outlive a full disk: the Acks stay in memory and reach the disk with the next
        index write that succeeds (until then a restart publishes those packets again, and ingest
        deduplicates them).
        """
        try:
            self.spool.flush()
        except OSError as exc:
            if not self._flush_failed:
                log.warning("cannot write the spool index: %s; Acks are kept in memory until it can", exc)
            self._flush_failed = True
            return
        if self._flush_failed:
            log.info("spool index written again")
            self._flush_failed = False

    # -- rounds ----------------------------------------------------------------------------------------

    def _rounds(self, stop: threading.Event) -> None:
        done_generation = 0
        failures = 0  # of the current round in a row
        while not stop.is_set():
            with self._cond:
                if self._generation == done_generation:
                    self._cond.wait(0.5)
                spec, generation = self._spec, self._generation
            if stop.is_set() or spec is None or generation == done_generation:
                continue
            try:
                self._score_round(spec, generation, stop)
                done_generation, failures = generation, 0
            except _Cancelled:
                log.info("round %d: scoring abandoned (a newer RoundSpec, or shutdown)", spec.round)
            except FetchError as exc:
                log.error("round %d: %s; retrying in %.0f s", spec.round, exc, 10.0)
                self._publish_status(force=True, detail=str(exc)[:500])
                stop.wait(10.0)
            except Exception as exc:  # the device stays up: a new RoundSpec or a retry may succeed
                delay = min(RETRY_MIN_S * 2**failures, RETRY_MAX_S)
                failures += 1
                self._round_failed(spec, exc, delay)
                if self._wait_for_round(generation, delay, stop):
                    failures = 0

    def _round_failed(self, spec: RoundSpec, exc: Exception, delay: float) -> None:
        """Log a scoring failure (a traceback unless it is a model error) and show it in the status."""
        if isinstance(exc, ModelError):
            log.error("round %d: scoring failed: %s; retrying in %.0f s", spec.round, exc, delay)
        else:
            log.exception("round %d: scoring failed; retrying in %.0f s", spec.round, delay)
        reason = exc.message if isinstance(exc, ModelError) else f"{type(exc).__name__}: {exc}"
        self._publish_status(
            force=True, state=DeviceState.ONLINE, round=spec.round, detail=f"scoring failed: {reason}"[:500]
        )

    def _wait_for_round(self, generation: int, seconds: float, stop: threading.Event) -> bool:
        """Wait `seconds` unless stopped first; True when a new RoundSpec ended the wait."""
        deadline = time.monotonic() + seconds
        while not stop.is_set() and (left := deadline - time.monotonic()) > 0:
            with self._cond:
                if self._generation != generation:
                    return True
                self._cond.wait(min(left, 0.5))  # `stop` does not notify the condition
        return False

    def _current(self, generation: int) -> None:
        if self._generation != generation:
            raise _Cancelled

    def _score_round(self, spec: RoundSpec, generation: int, stop: threading.Event) -> None:
        assignments = spec.assignments.get(self.device, [])
        self._keep_cursors_of(spec)
        if not assignments:
            self._publish_status(
                force=True, state=DeviceState.ONLINE, round=spec.round, detail="not assigned"
            )
            return
        if datetime.now(UTC) >= spec.deadline:
            log.warning("round %d: deadline %s has passed; not scoring", spec.round, spec.deadline)
            self._publish_status(
                force=True, state=DeviceState.ONLINE, round=spec.round, detail="deadline passed"
            )
            return
        if spec.tokenizer != self.fingerprint:
            log.error(
                "round %d uses tokenizer %s, this model has %s; not scoring",
                spec.round,
                spec.tokenizer[:12],
                self.fingerprint[:12],
            )
            self._publish_status(force=True, round=spec.round, detail="tokenizer mismatch")
            return
        total = sum(a.stop - a.start for a in assignments)
        done = sum(self._resume_at(spec, a) - a.start for a in assignments)
        self._publish_status(
            force=True,
            state=DeviceState.SCORING,
            round=spec.round,
            sequences_done=done,
            sequences_total=total,
            detail="",
        )
        for assignment in assignments:
            begin = self._resume_at(spec, assignment)
            if begin >= assignment.stop:
                continue
            texts = fetch_shard(self._shard(spec, assignment.shard), self.config.device.state_dir / "shards")
            stop_at = min(assignment.stop, len(texts))
            done = self._score_assignment(spec, generation, assignment, texts, begin, stop_at, done, stop)
            if stop.is_set() or datetime.now(UTC) >= spec.deadline:
                break
        # The fleet's view must not call a round scored that the deadline cut short.
        late = not stop.is_set() and datetime.now(UTC) >= spec.deadline
        finished = not stop.is_set() and not late
        self._publish_status(
            force=True,
            state=DeviceState.ONLINE,
            sequences_done=done,
            detail="round scored" if finished else "deadline passed" if late else "",
        )
        log.info(
            "round %d scored=%s sequences=%d/%d unacked=%d",
            spec.round,
            finished,
            done,
            total,
            len(self.spool),
        )

    def _keep_cursors_of(self, spec: RoundSpec) -> None:
        """Forget the cursors of other rounds, and those of an earlier opening of this round: a federation
        that starts over counts rounds from 1 again, and its round must not be skipped as scored."""
        prefix = f"{spec.round}/"
        opening = f"{prefix}@opened"  # no shard id has an @, so no cursor key starts with it
        stamp = round(spec.opened_at.timestamp() * 1e6)
        if self.spool.cursor(opening) not in (None, stamp):
            prefix = opening  # keeps only the stamp of this round, replaced below
        self.spool.keep_cursors(prefix)
        self.spool.set_cursor(opening, stamp)

    def _shard(self, spec: RoundSpec, name: str) -> ShardRef:
        """The shard's reference in the newest copy of `spec`: its presigned URL may have been renewed."""
        with self._cond:
            latest = self._spec
        if latest is None or (latest.round, latest.opened_at) != (spec.round, spec.opened_at):
            latest = spec  # a newer round arrived; this work is about to be cancelled
        return next(s for s in latest.shards if s.shard == name)

    @staticmethod
    def _cursor_key(spec: RoundSpec, assignment: ShardAssignment) -> str:
        return f"{spec.round}/{assignment.shard}/{assignment.start}"

    def _resume_at(self, spec: RoundSpec, assignment: ShardAssignment) -> int:
        return max(assignment.start, self.spool.cursor(self._cursor_key(spec, assignment)) or 0)

    def _header(self, spec: RoundSpec, shard: str) -> PacketHeader:
        return packet_header(
            self.backend,
            federation=self.federation,
            round_id=spec.round,
            device=self.device,
            shard=shard,
            tokenizer=self.fingerprint,
            top_k=spec.top_k,
            top_p=spec.top_p,
            stages=spec.stages,
            patches=spec.patches,
        )

    def _score_assignment(
        self,
        spec: RoundSpec,
        generation: int,
        assignment: ShardAssignment,
        texts: list[str],
        begin: int,
        stop_at: int,
        done: int,
        stop: threading.Event,
    ) -> int:
        header = self._header(spec, assignment.shard)
        builder = PacketBuilder(header, budget=spec.packet_budget)
        key = self._cursor_key(spec, assignment)

        # A model of a shorter context scores its longest prefix of each sequence rather than none of it
        # (GPT-2's learned positions stop at 1,024; llama.cpp loads at most DEFAULT_CONTEXT).
        length = min(spec.max_tokens, self.backend.shape.context)

        def first_windows() -> Iterator[Window]:
            seen = -1
            for window in windows(self.tokenizer, texts[begin:stop_at], length):
                if window.record != seen:  # sequence i of a round is line i, cut to max_tokens
                    seen = window.record
                    yield replace(window, sequence_id=begin + window.record)

        writer = _SpoolWriter(lambda data, cursor: self._spool(data, spec.round, cursor, stop, generation))

        def spool(packets: list[bytes]) -> None:
            for skipped in builder.skipped:
                log.error(
                    "round %d: shard %s: %s; it is left out (a smaller max_tokens or top_k, a top_p or a "
                    "larger packet_budget in the RoundSpec makes it fit)",
                    spec.round,
                    assignment.shard,
                    skipped,
                )
            # Sequence ids rise through the round, so a packet's last one says where to resume after it.
            for data, last in zip(packets, builder.last_ids, strict=True):
                writer.put(data, (key, last + 1))

        try:
            done = self._score_chunks(spec, generation, first_windows(), header, builder, spool, done, stop)
            self._current(generation)
            spool(builder.flush())
        except BaseException:
            writer.close(check=False)
            raise
        writer.close()  # every packet is in the spool before the assignment's end cursor
        if not stop.is_set() and datetime.now(UTC) < spec.deadline:
            self.spool.set_cursor(key, stop_at)  # also past trailing records that gave no window
        return done

    def _score_chunks(
        self,
        spec: RoundSpec,
        generation: int,
        first_windows: Iterator[Window],
        header: PacketHeader,
        builder: PacketBuilder,
        spool: Callable[[list[bytes]], None],
        done: int,
        stop: threading.Event,
    ) -> int:
        id_dtype = np.uint16 if header.vocab_size <= 2**16 - 1 else np.uint32
        for chunk in batched(first_windows, self.config.model.batch_size):
            self._current(generation)
            scores = self.backend.score(
                [w.token_ids for w in chunk], top_k=spec.top_k, stages=spec.stages, patches=spec.patches
            )
            for window, score in zip(chunk, scores, strict=True):
                knowledge = to_knowledge(
                    window, score, spec.top_p, id_dtype, feature_stages=header.feature_stages
                )
                spool(builder.add(knowledge))
            done += len(chunk)
            self._publish_status(sequences_done=done)
            if stop.is_set() or datetime.now(UTC) >= spec.deadline:
                break
        return done

    def _spool(
        self, data: bytes, round_id: int, cursor: tuple[str, int], stop: threading.Event, generation: int
    ) -> None:
        while True:
            try:
                self.spool.add(data, round=round_id, cursor=cursor)
                if self._full_warned:
                    log.info("spool has room again; scoring resumes")
                    self._publish_status(force=True, detail="")  # the fleet's view must not stay "full"
                    self._full_warned = False
                return
            except SpoolFull as exc:
                if not self._full_warned:
                    log.warning("%s; scoring paused until the cloud acknowledges packets", exc)
                    self._publish_status(force=True, detail="spool full: waiting for acks")
                    self._full_warned = True
                self._current(generation)  # a newer round does not wait for this one's acks
                if stop.is_set():
                    log.warning(
                        "stopping with a full spool: the last packet is scored again at the next start"
                    )
                    raise _Cancelled from None
                self.spool.wait_for_room(len(data), 0.5)


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def _configure_logging(level: LogLevel) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def _load_configs(paths: list[Path], overrides: list[str]) -> list[DeviceConfig]:
    """Every config, validated before any agent starts; a ConfigError names the file at fault."""
    configs: list[DeviceConfig] = []
    for path in paths:
        try:
            configs.append(load_device_config(path, overrides))
        except ConfigError as exc:
            message = str(exc)
            if len(paths) == 1 or str(path) in message:
                raise
            raise ConfigError(f"{path}: {message}") from None
    devices: dict[str, Path] = {}
    spools: dict[Path, Path] = {}
    for path, cfg in zip(paths, configs, strict=True):
        if cfg.device.id in devices:
            raise ConfigError(
                f"{path}: device id {cfg.device.id!r} is also the device of {devices[cfg.device.id]}; "
                "each hosted device needs its own id (its MQTT client id and topic level)"
            )
        devices[cfg.device.id] = path
        spool = cfg.spool.dir.expanduser().resolve()
        if spool in spools:
            raise ConfigError(
                f"{path}: spool.dir {cfg.spool.dir} is also the spool of {spools[spool]}; "
                "each hosted device needs its own spool"
            )
        spools[spool] = path
    if len(configs) > 1:  # N agents x all cores would oversubscribe the CPU
        configs = [
            cfg
            if cfg.model.threads is not None
            else cfg.model_copy(update={"model": cfg.model.model_copy(update={"threads": 1})})
            for cfg in configs
        ]
    return configs


def _host(configs: list[DeviceConfig], stop: threading.Event) -> int:
    """Run one agent per config, each in its own thread, until all have ended; the number that failed."""
    failed: list[str] = []

    def one(cfg: DeviceConfig) -> None:
        device = cfg.device.id
        try:
            Agent(cfg).run(stop)
        except Exception as exc:
            from deepfusion.edge.errors import ModelError

            failed.append(device)
            if isinstance(exc, (ModelError, ConfigError)):
                log.error("agent failed device=%s: %s", device, exc)
            else:
                log.exception("agent failed device=%s", device)

    threads = [
        threading.Thread(target=one, args=(cfg,), name=f"agent-{cfg.device.id}", daemon=True)
        for cfg in configs
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(timeout=0.5)  # a short join keeps the main thread free to run signal handlers
    if failed:
        log.error("%d of %d agents failed: %s", len(failed), len(configs), ", ".join(sorted(failed)))
    return len(failed)


def run(
    config: list[Path] = typer.Option(
        ...,
        "--config",
        "-c",
        help="Device config (TOML), e.g. device.toml; repeat to host several devices in this process.",
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a config key: section.key=value (repeatable; applies to every config)."
    ),
    log_level: LogLevel = typer.Option(LogLevel.info, case_sensitive=False, help="How much to log."),
) -> None:
    """Run the device agent: join the federation, score rounds, publish knowledge until stopped.
    Several --config files host several devices in one process, the way a simulator runs many devices
    on one machine: each device runs in its own thread with its own MQTT client, spool and model, and
    the devices share the process and its CPU (a config without model.threads gets 1 thread). Every
    config is checked before any device starts (exit 2 on an error). SIGTERM or SIGINT stops every
    device; a device that fails is logged while the others keep running, and the exit code is then 1.
    """
    from deepfusion.edge.errors import ModelError

    _configure_logging(log_level)
    try:
        configs = _load_configs(config, set_)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    stop = threading.Event()

    def _stop(signum: int, frame: Any) -> None:
        log.info("signal %s: finishing the current batch", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if len(configs) > 1:
        if _host(configs, stop):
            raise typer.Exit(1)
        return
    try:
        Agent(configs[0]).run(stop)
    except (ModelError, ConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
