"""The simulator's device builds (`deepfusion.cloud.sim.devices`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepfusion.cloud.sim.devices import DeviceJob, build_devices


def test_a_failed_build_names_its_device_and_its_log(tmp_path: Path) -> None:
    """The error used to be the bare worker exception, with no device, and no traceback in any log."""
    jobs = [
        DeviceJob(
            device=f"med-{i:02d}",
            domain="medical",
            preset="student-tiny",
            backend="torch",
            share=i,
            base=str(tmp_path / "no-such-base"),
            private=str(tmp_path / "private.jsonl"),
            directory=str(tmp_path / f"med-{i:02d}"),
            max_tokens=32,
            finetune={"steps": 1, "batch_size": 1, "lr": 1e-3, "lora_r": 2},
            seed=i,
        )
        for i in range(2)
    ]
    log = tmp_path / "med-00" / "build.log"
    with pytest.raises(RuntimeError, match=rf"device med-00: build failed .*{log}"):
        build_devices(jobs, workers=1)
    assert "Traceback" in log.read_text()  # the worker's error is in the log the message names
