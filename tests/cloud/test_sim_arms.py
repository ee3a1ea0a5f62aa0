"""The simulator's comparison arms (`deepfusion.cloud.sim.arms`): how they are run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


_CTRL_C_SCRIPT = """
import sys, time
from pathlib import Path

def slow(setup, method):
    (Path(setup.store_uri) / method).touch()  # this arm started
    time.sleep(30)
    return {}, 30.0, 0

if __name__ == "__main__":
    from deepfusion.cloud.sim import arms
    from deepfusion.cloud.trainer import TrainSpec
    import ctrl_c_arms
    arms.run_arm = ctrl_c_arms.slow
    root = Path(sys.argv[1])
    setup = arms.ArmsSetup(
        store_uri=str(root), federation="fed", round_id=0, base=root, tokenizer=root, test_files={},
        max_tokens=32, spec=TrainSpec(), cluster_domain={0: "medical"}, private_files={}, checkpoints={},
        public_texts=(),
    )
    arms.run_arms(setup, ["arm-0", "arm-1", "arm-2", "arm-3"], 2, lambda *_: None)
"""


def test_ctrl_c_in_a_terminal_ends_the_running_arms_at_once(tmp_path: Path) -> None:
    """Ctrl-C reaches the workers too; as a KeyboardInterrupt it ended only their task, and a worker then
    trained the arm already handed to it: the run went on for a whole baseline (minutes) after Ctrl-C."""
    (tmp_path / "ctrl_c_arms.py").write_text(_CTRL_C_SCRIPT)
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    command = [sys.executable, str(tmp_path / "ctrl_c_arms.py"), str(marks)]
    process = subprocess.Popen(command, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(marks.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        interrupted = time.monotonic()
        process.wait(timeout=60)
        assert time.monotonic() - interrupted < 15
        assert sorted(p.name for p in marks.iterdir()) == ["arm-0", "arm-1"]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
