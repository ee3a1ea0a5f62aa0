"""Phase II checkpoints in the object store, so a killed `train --round R` resumes where it stopped.

    checkpoints = Checkpoints(store, "fed", 3, fingerprint=repr(spec))
    checkpoints.save(cluster, {"trainer": trainer.state_dict(), "history": history, "done": False})
    state = checkpoints.load(cluster)   # None when absent, or written under other settings;
                                        # ValueError when unreadable

Kept under `{fed}/rounds/{round}/checkpoints/cluster-{c}.pt` (the store, not the trainer's disk: the
machine that resumes need not be the one that stopped) and removed once the release is written.
Loaded with `torch.load(weights_only=True)`: tensors and plain containers only, nothing executed.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import torch

from deepfusion.cloud.rounds import round_prefix
from deepfusion.shared.store import ObjectNotFound, ObjectStore

__all__ = ["Checkpoints"]

log = logging.getLogger(__name__)


class Checkpoints:
    def __init__(self, store: ObjectStore, federation: str, round_id: int, *, fingerprint: str) -> None:
        self.store = store
        self.prefix = f"{round_prefix(federation, round_id)}checkpoints/"
        self.fingerprint = fingerprint  # the settings a checkpoint was written under

    def _key(self, cluster: int) -> str:
        return f"{self.prefix}cluster-{cluster}.pt"

    def save(self, cluster: int, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save({**state, "fingerprint": self.fingerprint}, buffer)
        self.store.put(self._key(cluster), buffer.getvalue())

    def load(self, cluster: int) -> dict[str, Any] | None:
        try:
            data = self.store.get(self._key(cluster))
        except ObjectNotFound:
            return None
        try:
            # Onto the CPU: the tensors of a GPU run name its device, which the resuming machine (or
            # rank) may not have; `load_state_dict` puts them where the trainer's parameters are.
            state: dict[str, Any] = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:  # truncated or foreign bytes; torch raises several types for them
            raise ValueError(
                f"the phase II checkpoint {self._key(cluster)} is unreadable ({type(exc).__name__}: {exc}); "
                "train with --no-resume to start the round over"
            ) from None
        if state.get("fingerprint") != self.fingerprint:
            log.warning("ignored the checkpoint of cluster %d: written under other settings", cluster)
            return None
        return state

    def clear(self) -> None:
        for key in self.store.list(self.prefix):
            self.store.delete(key)
