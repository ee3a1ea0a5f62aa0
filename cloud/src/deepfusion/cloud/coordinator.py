"""`deepfusion-cloud coordinator`: devices to clusters, rounds to releases (design sections 3 and 5).

    Coordinator(config).run(stop_event)

Each `step()` reads where the federation stands from the object store and does the one next thing:

    no state.json for the current round   -> plan it (clusters, assignments), write state, publish RoundSpec
    state "open"                          -> index new packets, update coverage, close at full coverage
                                             or at the deadline (quorum decides whether it counts)
    state "closed"                        -> clear the retained RoundSpec; when the trainer has written
                                             `{fed}/releases/{version}/release.json` for the round,
                                             publish the ReleaseNote and open the next round

State lives only in the store: `{fed}/coordinator.json` names the current round and
`{fed}/rounds/{round}/state.json` holds its spec, clusters, coverage and outcome
(`clusters.json` and `coverage.json` beside it). Every step is idempotent: state is written before it is
announced, and announcing again (a retained publish) is harmless, so a coordinator killed at any point
continues where it stopped when it starts again.

One coordinator per federation: a second one started by mistake cannot replace a round once it is
opened (state.json is created, never overwritten, then) and logs an error when it finds that out, but the
later writes of state.json are not guarded against it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from pydantic import ValidationError

from deepfusion.cloud.cluster import cluster_devices
from deepfusion.cloud.registry import FederationView
from deepfusion.cloud.rounds import (
    PacketIndex,
    RoundState,
    close_decision,
    coordinator_key,
    coverage_report,
    plan_assignments,
    round_prefix,
    state_key,
)
from deepfusion.cloud.settings import CloudConfig
from deepfusion.cloud.shards import list_shards, shard_key
from deepfusion.shared.messages import (
    MessageError,
    ReleaseNote,
    RoundSpec,
    decode_message,
    encode_message,
    validation_problems,
)
from deepfusion.shared.mqtt import MqttClient
from deepfusion.shared.store import ObjectNotFound, ObjectStore, StoreError, open_store
from deepfusion.shared.topics import release_topic, round_topic

__all__ = ["Coordinator", "read_pointer", "read_state", "release_key"]

log = logging.getLogger(__name__)


def release_key(federation: str, version: str) -> str:
    """Where the trainer announces a finished release: `{fed}/releases/{version}/release.json`."""
    return f"{federation}/releases/{version}/release.json"


def read_pointer(store: ObjectStore, federation: str) -> int | None:
    key = coordinator_key(federation)
    try:
        data = store.get(key)
    except ObjectNotFound:
        return None
    try:
        return int(json.loads(data)["round"])
    except (ValueError, KeyError, TypeError) as exc:  # not JSON, no round, not a number
        raise _damaged(key, f"{type(exc).__name__}: {exc}", "the coordinator finds the round again") from None


def read_state(store: ObjectStore, federation: str, round_id: int) -> RoundState | None:
    found = _read_state_and_etag(store, federation, round_id)
    return None if found is None else found[0]


def _read_state_and_etag(store: ObjectStore, federation: str, round_id: int) -> tuple[RoundState, str] | None:
    key = state_key(federation, round_id)
    try:
        data, etag = store.get_with_etag(key)
    except ObjectNotFound:
        return None
    try:
        return RoundState.model_validate_json(data), etag
    except ValidationError as exc:
        anew = f"the coordinator plans round {round_id} anew"
        raise _damaged(key, validation_problems(exc), anew) from None


def _damaged(key: str, problem: str, if_deleted: str) -> StoreError:
    """The store holds a state file the coordinator cannot read: only corruption does that (writes are
    atomic), and overwriting it could lose a round, so the services stop and say how to recover."""
    return StoreError(f"{key} is damaged ({problem}); restore it from a backup, or delete it: {if_deleted}")


def _now() -> datetime:
    return datetime.now(UTC)


class Coordinator:
    """The coordinator of one federation. `step()` does one idempotent step; `run()` loops over it."""

    def __init__(
        self,
        config: CloudConfig,
        store: ObjectStore | None = None,
        *,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        self.config = config
        self.settings = config.coordinator
        self.federation = config.federation
        self.store = store if store is not None else open_store(config.store)
        self.view = FederationView(self.federation)
        self.clock = clock
        self.client: MqttClient | None = None
        self._index: tuple[int, PacketIndex] | None = None
        self._signed: tuple[int, datetime] | None = None  # round whose shard URLs were signed, and when
        self.done = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------------

    def connect(self) -> MqttClient:
        client = MqttClient(self.config.mqtt, f"coordinator-{self.federation}")
        self.view.subscribe(client)
        client.connect()
        self.view.wait_settled(self.config.status.settle_s)
        self.client = client
        return client

    def run(self, stop: threading.Event) -> None:
        client = self.connect()
        try:
            while not stop.is_set():
                outcome = self.step()
                log.debug("coordinator step: %s", outcome)
                if self.done.is_set():
                    log.info("coordinator: %d rounds done", self.settings.max_rounds or 0)
                    return
                stop.wait(self.settings.tick_s)
        finally:
            client.close()

    # -- the step --------------------------------------------------------------------------------------

    def step(self) -> str:
        """Do the next thing the federation needs; returns what it did, in words."""
        pointer = read_pointer(self.store, self.federation)
        round_id = self.settings.first_round if pointer is None else pointer
        # A crash between writing a round's state and the pointer leaves the pointer behind (or absent,
        # in the first round): catch up.
        while self.store.exists(state_key(self.federation, round_id + 1)):
            round_id += 1
        found = _read_state_and_etag(self.store, self.federation, round_id)
        if found is None:
            if self._rounds_done(round_id):
                self.done.set()
                return "done"
            return self._open(round_id)
        if round_id != pointer:
            self._write_pointer(round_id)
        state, etag = found
        if state.status == "open":
            return self._watch(state, etag)
        return self._after_close(state, etag)

    def _rounds_done(self, round_id: int) -> bool:
        limit = self.settings.max_rounds
        return limit is not None and round_id - self.settings.first_round >= limit

    # -- opening -----------------------------------------------------------------------------------------

    def _open(self, round_id: int) -> str:
        # One snapshot of the view: a card cleared between two reads would leave a member without a record.
        records = self.view.devices()
        cards = {d: r.card for d, r in records.items() if r.card is not None}
        tokenizer = self.settings.tokenizer or _most_common([c.tokenizer for c in cards.values()])
        members = {d: c for d, c in cards.items() if c.tokenizer == tokenizer}
        # A device that announced it is offline gets no work, which would only wait for the deadline;
        # its card still counts for the clusters.
        away = {d for d in members if d in records and records[d].offline}
        if len(members) - len(away) < self.settings.min_devices:
            online = len(members) - len(away)
            return f"round {round_id}: waiting for devices ({online}/{self.settings.min_devices})"
        # The URLs' lifetime starts as list_shards signs them, and reading every shard before the
        # round opens can take minutes: renewing them counts from here, not from the opening.
        signed_at = self.clock()
        shards = list_shards(self.store, self.federation, expires_s=self.config.store.presign_expiry_s)
        if not shards:
            return f"round {round_id}: waiting for public shards under {self.federation}/shards/"
        assert tokenizer is not None
        previous = read_state(self.store, self.federation, round_id - 1) if round_id > 0 else None
        report = cluster_devices(
            {d: c.embedding for d, c in members.items()},
            self.settings.clusters,
            seed=self.settings.seed,
            previous_centroids=previous.clusters.centroids if previous else None,
        )
        throughput = {d: t for d in members if (t := records[d].throughput) is not None}
        working = {d: cluster for d, cluster in report.assignment.items() if d not in away}
        now = self.clock()
        spec = RoundSpec(
            federation=self.federation,
            round=round_id,
            tokenizer=tokenizer,
            shards=shards,
            assignments=plan_assignments(shards, working, self.settings.redundancy, throughput),
            top_k=self.settings.top_k,
            top_p=self.settings.top_p,
            stages=self.settings.stages,
            patches=self.settings.patches,
            max_tokens=self.settings.max_tokens,
            packet_budget=self.settings.packet_budget,
            deadline=now + timedelta(seconds=self.settings.round_s),
            opened_at=now,
        )
        state = RoundState(
            federation=self.federation,
            round=round_id,
            status="open",
            spec=spec,
            clusters=report,
            opened_at=now,
        )
        # Created, never replaced: a second coordinator started by mistake finds the round planned
        # meanwhile, and overwriting would swap the plan under devices already working on the first.
        if not self.store.put_new(state_key(self.federation, round_id), _state_json(state)):
            log.error(
                "round %d was opened by another coordinator meanwhile: is a second one running for %s?",
                round_id,
                self.federation,
            )
            return f"round {round_id}: opened by another coordinator"
        # After the state: the trainer prefers clusters.json, which must be the plan's clustering.
        prefix = round_prefix(self.federation, round_id)
        self.store.put(f"{prefix}clusters.json", report.model_dump_json(indent=1).encode())
        self._write_pointer(round_id)
        self._publish(round_topic(self.federation), encode_message(spec))
        self._signed = (round_id, signed_at)
        if away:
            log.info("round %d: no work for %s, offline", round_id, ", ".join(sorted(away)))
        log.info(
            "round %d open: %d devices, %d shards, deadline %s\n%s",
            round_id,
            len(working),
            len(shards),
            spec.deadline.isoformat(),
            report.summary(),
        )
        return f"round {round_id}: opened"

    # -- an open round ------------------------------------------------------------------------------------

    def _index_for(self, round_id: int) -> PacketIndex:
        if self._index is None or self._index[0] != round_id:
            self._index = (round_id, PacketIndex.load(self.store, self.federation, round_id))
        return self._index[1]

    def _watch(self, state: RoundState, etag: str) -> str:
        current = self.view.round
        if current is None or current.round != state.round or current.opened_at != state.spec.opened_at:
            self._publish(round_topic(self.federation), encode_message(self._resigned(state.spec)))
        elif self._signed is None or self._signed[0] != state.round or self._urls_half_expired():
            resigned = self._resigned(current)
            if resigned.shards != current.shards:  # a local store's file:// URLs never change
                self._publish(round_topic(self.federation), encode_message(resigned))
        index = self._index_for(state.round)
        new = index.update(self.store, self.federation, state.round)
        if new:
            index.save(self.store, self.federation, state.round)
        coverage = coverage_report(
            state.spec, state.clusters.assignment, index.delivered(), packets=len(index.entries)
        )
        reason = close_decision(coverage, state.spec.deadline, self.clock(), self.settings.quorum)
        if reason is None:
            # Compared with the state, not "any new packets?": a coordinator killed between saving the
            # index and the state finds no new packet after a restart, and its state would stay stale.
            stale = coverage.packets != (state.coverage.packets if state.coverage else 0)
            if stale and self._write_state(state.model_copy(update={"coverage": coverage}), etag) is None:
                return _changed_meanwhile(state.round)
            return f"round {state.round}: {coverage.delivered}/{coverage.assigned} delivered"
        closed = state.model_copy(
            update={
                "status": "closed",
                "closed_at": self.clock(),
                "close_reason": reason,
                "coverage": coverage,
            }
        )
        closed_etag = self._write_state(closed, etag)
        if closed_etag is None:
            return _changed_meanwhile(state.round)
        log.info(
            "round %d closed (%s): %d/%d delivered, %d packets, %.0f%% of cluster slots",
            state.round,
            reason,
            coverage.delivered,
            coverage.assigned,
            coverage.packets,
            100 * coverage.slot_fraction,
        )
        self._after_close(closed, closed_etag)
        return f"round {state.round}: closed ({reason})"

    def _urls_half_expired(self) -> bool:
        assert self._signed is not None
        return (self.clock() - self._signed[1]).total_seconds() > self.config.store.presign_expiry_s / 2

    def _resigned(self, spec: RoundSpec) -> RoundSpec:
        """`spec` with freshly presigned shard URLs (same shards, checksums and everything else).

        Devices hold nothing but these short-lived URLs (`store.presign_expiry_s`), so an open round is
        re-announced with new ones every half lifetime; a device that joins late or resumes after an
        outage always finds URLs that still work. Signing reads no shard.
        """
        expiry = self.config.store.presign_expiry_s
        self._signed = (spec.round, self.clock())
        shards = [
            s.model_copy(update={"url": self.store.url(shard_key(self.federation, s.shard), expiry)})
            for s in spec.shards
        ]
        return spec.model_copy(update={"shards": shards})

    # -- a closed round ------------------------------------------------------------------------------------

    def _after_close(self, state: RoundState, etag: str) -> str:
        current = self.view.round
        if current is not None and current.round == state.round:
            self._publish(round_topic(self.federation), b"")  # no round is open until the next one
        if state.close_reason != "deadline-no-quorum":
            if state.release is None:
                note = self._find_release(state.round)
                if note is None:
                    return f"round {state.round}: closed, waiting for its release"
                if self._write_state(state.model_copy(update={"release": note.version}), etag) is None:
                    return _changed_meanwhile(state.round)
                self._publish_release(note)
            elif (published := self.view.release) is None or published.version != state.release:
                note = self._find_release(state.round, state.release)
                if note is not None:
                    self._publish_release(note)
        next_round = state.round + 1
        if self._rounds_done(next_round):
            self.done.set()
            return f"round {state.round}: closed; last round"
        return self._open(next_round)

    def _find_release(self, round_id: int, version: str | None = None) -> ReleaseNote | None:
        prefix = f"{self.federation}/releases/"
        found: list[ReleaseNote] = []
        for key in self.store.list(prefix):
            if not key.endswith("/release.json") or key.count("/") != prefix.count("/") + 1:
                continue
            try:
                note = decode_message(ReleaseNote, self.store.get(key))
            except (MessageError, ObjectNotFound) as exc:
                log.warning("ignored release file %s: %s", key, exc)
                continue
            wanted = version is None or note.version == version
            if note.round == round_id and note.federation == self.federation and wanted:
                found.append(note)
        return max(found, key=lambda n: n.created_at) if found else None

    def _publish_release(self, note: ReleaseNote) -> None:
        self._publish(release_topic(self.federation), encode_message(note))
        log.info("release %s of round %d published: %s", note.version, note.round, note.uri)

    # -- writing -------------------------------------------------------------------------------------------

    def _write_state(self, state: RoundState, etag: str) -> str | None:
        """Replace the round's state only if it is still the version this step read; its new tag.

        A second coordinator started by mistake reads and writes the same state: without the condition,
        one that read "open" could write its coverage over the other's "closed" and reopen the round.
        """
        written = self.store.put_if_match(state_key(self.federation, state.round), _state_json(state), etag)
        if written is None:
            log.error(
                "round %d's state changed since this coordinator read it: is a second one running for %s?",
                state.round,
                self.federation,
            )
        return written

    def _write_pointer(self, round_id: int) -> None:
        body = {"federation": self.federation, "round": round_id, "updated_at": self.clock().isoformat()}
        self.store.put(coordinator_key(self.federation), json.dumps(body).encode())

    def _publish(self, topic: str, payload: bytes) -> None:
        if self.client is None:
            raise RuntimeError("the coordinator is not connected; call connect() or run()")
        self.client.publish_and_wait(topic, payload, retain=True)


def _changed_meanwhile(round_id: int) -> str:
    return f"round {round_id}: state changed by another coordinator; reading it again"


def _state_json(state: RoundState) -> bytes:
    return state.model_dump_json(indent=1).encode()


def _most_common(values: list[str]) -> str | None:
    if not values:
        return None
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))
