"""The simulator's device builds (`deepfusion.cloud.sim.devices`)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deepfusion.cloud.sim import devices
from deepfusion.cloud.sim.devices import DeviceJob, build_devices


def _jobs(root: Path, count: int, base: Path) -> list[DeviceJob]:
    """`count` medical devices building under `root` from `base`, one step of fine-tuning each."""
    return [
        DeviceJob(
            device=f"med-{i:02d}",
            domain="medical",
            preset="student-tiny",
            backend="torch",
            share=i,
            base=str(base),
            private=str(root / "private.jsonl"),
            directory=str(root / f"med-{i:02d}"),
            max_tokens=32,
            finetune={"steps": 1, "batch_size": 1, "lr": 1e-3, "lora_r": 2},
            seed=i,
        )
        for i in range(count)
    ]


def test_a_failed_build_names_its_device_and_its_log(tmp_path: Path) -> None:
    """The error used to be the bare worker exception, with no device, and no traceback in any log."""
    jobs = _jobs(tmp_path, 2, tmp_path / "no-such-base")
    log = tmp_path / "med-00" / "build.log"
    with pytest.raises(RuntimeError, match=rf"device med-00: build failed .*{log}"):
        build_devices(jobs, workers=1)
    assert "Traceback" in log.read_text()  # the worker's error is in the log the message names


def _slow_build(job: DeviceJob) -> str:
    """Stands in for a device build in the worker process: half a second of work that leaves its folder."""
    time.sleep(0.5)
    Path(job.directory).mkdir(parents=True)
    return job.device


def test_ctrl_c_cancels_the_builds_not_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Leaving the pool waited for every queued device: after Ctrl-C the whole fleet was still built."""
    monkeypatch.setattr(devices, "_build", _slow_build)
    jobs = _jobs(tmp_path, 12, tmp_path / "base")

    def interrupt(_: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the first device is reported

    with pytest.raises(KeyboardInterrupt):
        build_devices(jobs, workers=1, on_done=interrupt)
    built = [job.device for job in jobs if Path(job.directory).is_dir()]
    assert len(built) < len(jobs) // 2, built  # the first, and the few the pool had already handed out


def test_device_config_holds_any_path(tmp_path: Path) -> None:
    """Paths went into the TOML unescaped: a folder with a quote or a backslash broke the agent's config."""
    from deepfusion.edge.agent_config import load_device_config
    from deepfusion.shared.config import MqttConfig

    odd = tmp_path / 'run "a"\\b'
    (job,) = _jobs(odd, 1, odd / "base")
    build = devices.DeviceBuild(
        job=job, checkpoint=str(odd / "model"), runtime_model=str(odd / "model"), architecture="llama",
        params=1, val_loss_before=0.0, val_loss_after=0.0, finetune_s=0.0, export_s=0.0,
    )  # fmt: skip
    path = devices.write_device_config(build, "fed", MqttConfig(), odd / "state")
    config = load_device_config(path)
    assert config.device.state_dir == odd / "state" and config.spool.dir == odd / "state" / "spool"
    assert config.model.path == odd / "model" and config.data.private == odd / "private.jsonl"
