"""The simulator's comparison arms (`deepfusion.cloud.sim.arms`): how they are run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deepfusion.cloud.sim import arms
from deepfusion.cloud.sim.arms import ArmResult, ArmsSetup, run_arms
from deepfusion.cloud.trainer import TrainSpec


def _slow_arm(setup: ArmsSetup, method: str) -> ArmResult:
    """Stands in for an arm in the worker process: half a second of training that leaves a mark."""
    time.sleep(0.5)
    (Path(setup.store_uri) / method).mkdir(parents=True)
    return {}, 0.5, 0


def test_ctrl_c_cancels_the_arms_not_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Leaving the pool waited for every queued arm: after Ctrl-C each baseline was still trained."""
    monkeypatch.setattr(arms, "run_arm", _slow_arm)
    setup = ArmsSetup(
        store_uri=str(tmp_path),
        federation="fed",
        round_id=0,
        base=tmp_path / "base",
        tokenizer=tmp_path / "tokenizer",
        test_files={},
        max_tokens=32,
        spec=TrainSpec(),
        cluster_domain={0: "medical"},
        private_files={},
        checkpoints={},
        public_texts=(),
    )
    methods = [f"arm-{i}" for i in range(12)]

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the first arm is reported

    with pytest.raises(KeyboardInterrupt):
        run_arms(setup, methods, 1, interrupt)
    trained = sorted(p.name for p in tmp_path.iterdir())
    assert len(trained) < len(methods) // 2, trained  # the first, and the few already handed out
