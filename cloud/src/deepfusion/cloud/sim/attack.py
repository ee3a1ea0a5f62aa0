"""A hostile device for the simulator: valid packets, poisoned knowledge.

    python -c "from deepfusion.cloud.sim.attack import main; main()" device.toml --target 42

The device runs the real edge agent with its real model, but every score its backend returns is
shifted before it is packed: `mass` of each next-token distribution moves onto one target token, and
the reported NLL shrinks by `nll_scale` so that quality-weighted distillation trusts it more. Every
packet passes ingest (ids, masses and NLLs are all in range); only the cloud's screening
(`deepfusion.cloud.robust`) can tell it from an honest one.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

__all__ = ["Poison", "PoisonedBackend", "main", "poison_score"]


@dataclass(frozen=True)
class Poison:
    target: int  # token id the poisoned distributions favour
    mass: float = 0.8  # probability moved onto it at every position
    nll_scale: float = 0.5  # reported seq_nll = honest seq_nll x this


def poison_score(score: Any, poison: Poison) -> Any:
    """A backend `SequenceScore` with `poison` applied (top-k rows stay sorted and unique)."""
    ids = score.topk_ids.copy()
    probs = np.exp(score.topk_logprobs.astype(np.float64)) * (1.0 - poison.mass)
    has = ids == poison.target
    rows = has.any(axis=1)
    probs[has] += poison.mass
    # Where the target is not in a row's top-k it takes the least likely entry's place (that entry's
    # probability joins the tail).
    ids[~rows, -1] = poison.target
    probs[~rows, -1] = poison.mass
    order = np.argsort(-probs, axis=1, kind="stable")
    logprobs = np.log(np.take_along_axis(probs, order, axis=1)).astype(np.float32)
    return replace(
        score,
        topk_ids=np.take_along_axis(ids, order, axis=1),
        topk_logprobs=logprobs,
        nll=score.nll * poison.nll_scale,
    )


class PoisonedBackend:
    """Wraps a scoring backend; everything but `score` passes through."""

    def __init__(self, inner: Any, poison: Poison) -> None:
        self._inner, self._poison = inner, poison

    def score(self, sequences: Any, **kwargs: Any) -> list[Any]:
        return [poison_score(s, self._poison) for s in self._inner.score(sequences, **kwargs)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __enter__(self) -> PoisonedBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()


def main() -> None:
    """`attack.main CONFIG --target ID [--mass M] [--nll-scale S]`: run one poisoned device agent."""
    import argparse

    from deepfusion.edge.agent import Agent
    from deepfusion.edge.agent_config import load_device_config

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("config")
    parser.add_argument("--target", type=int, required=True)
    parser.add_argument("--mass", type=float, default=Poison.mass)
    parser.add_argument("--nll-scale", type=float, default=Poison.nll_scale)
    args = parser.parse_args()
    poison = Poison(args.target, args.mass, args.nll_scale)

    class PoisonedAgent(Agent):
        def load_backend(self, name: str, path: Any) -> Any:
            return PoisonedBackend(super().load_backend(name, path), poison)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    PoisonedAgent(load_device_config(args.config)).run(stop)
    sys.exit(0)
