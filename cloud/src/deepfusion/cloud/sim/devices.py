"""Each simulated device's own model: LoRA fine-tune on its private share, merge, export for its runtime.

This is the edge package's own path (`deepfusion-edge finetune --merge`, then `export`), run for every
device before the federation starts, two devices at a time on separate processes. A finished device is
reused when the same profile runs again (its `build.json` records what it was built from).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from deepfusion.cloud.sim.profile import FinetuneSection
from deepfusion.shared.config import MqttConfig, mqtt_toml, toml_string

__all__ = ["DeviceBuild", "DeviceJob", "build_devices", "end_on_ctrl_c", "write_device_config"]


@dataclass(frozen=True)
class DeviceJob:
    device: str
    domain: str
    preset: str
    backend: str
    share: int
    base: str  # base checkpoint directory
    private: str  # private JSONL
    directory: str
    max_tokens: int
    finetune: dict[str, float | int]
    seed: int


@dataclass(frozen=True)
class DeviceBuild:
    job: DeviceJob
    checkpoint: str  # merged transformers directory (what a weight upload would ship)
    runtime_model: str  # what the agent loads: the checkpoint, an ONNX directory or a .gguf file
    architecture: str
    params: int
    val_loss_before: float
    val_loss_after: float
    finetune_s: float
    export_s: float


def _build(job: DeviceJob) -> DeviceBuild:
    import torch

    torch.set_num_threads(1)
    directory = Path(job.directory)
    directory.mkdir(parents=True, exist_ok=True)
    # The worker's own output (exporter warnings, progress) goes to the device's log, not the terminal.
    log = os.open(directory / "build.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        return _build_in(job, directory)
    except BaseException:
        import traceback

        traceback.print_exc()  # into build.log, which the error raised in the parent names
        raise


def _build_in(job: DeviceJob, directory: Path) -> DeviceBuild:
    import time

    from deepfusion.edge.finetune import FinetuneSettings, finetune

    record = directory / "build.json"
    if record.is_file():
        done = json.loads(record.read_text())
        if done["job"] == asdict(job):
            return DeviceBuild(**{**done, "job": job})
    ft = job.finetune
    result = finetune(
        FinetuneSettings(
            model=Path(job.base),
            data=Path(job.private),
            output=directory / "finetune",
            steps=int(ft["steps"]),
            batch_size=int(ft["batch_size"]),
            max_tokens=job.max_tokens,
            lr=float(ft["lr"]),
            lora_r=int(ft["lora_r"]),
            lora_alpha=2 * int(ft["lora_r"]),
            save_every=0,
            seed=job.seed,
            merge=True,
            device="cpu",
            threads=1,
        ),
        progress=False,
    )
    assert result.merged is not None
    started = time.perf_counter()
    runtime = result.merged
    if job.backend == "onnxruntime":
        from deepfusion.edge.export.onnx import export_onnx

        runtime = str(export_onnx(result.merged, directory / "onnx", quant="int8").parent)
    elif job.backend == "llama_cpp":
        from deepfusion.edge.export.gguf import export_gguf

        runtime = str(export_gguf(result.merged, directory / "gguf", quant="q8_0", threads=1))
    config = json.loads((Path(result.merged) / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(Path(result.merged) / "model.safetensors"), "pt") as weights:
        params = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118 (safetensors handle, not a dict)
    build = DeviceBuild(
        job=job,
        checkpoint=result.merged,
        runtime_model=runtime,
        architecture=config["architectures"][0],
        params=params,
        val_loss_before=result.val_loss_before,
        val_loss_after=result.val_loss_after,
        finetune_s=result.seconds,
        export_s=time.perf_counter() - started,
    )
    record.write_text(json.dumps(asdict(build), indent=1))
    return build


def end_on_ctrl_c() -> None:
    """Pool worker initializer: Ctrl-C (SIGINT to the whole process group) ends the worker at once.

    As a KeyboardInterrupt it ended only the task: the pool's worker catches it, reports it and runs the
    next task already handed to it, so the run went on for a whole device build or baseline after Ctrl-C.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def build_devices(
    jobs: list[DeviceJob], workers: int = 2, on_done: Callable[[DeviceBuild], None] | None = None
) -> list[DeviceBuild]:
    """Fine-tune and export every device; `workers` processes at a time (spawned: torch and fork clash)."""
    context = multiprocessing.get_context("spawn")
    size = max(1, min(workers, len(jobs)))
    with ProcessPoolExecutor(size, mp_context=context, initializer=end_on_ctrl_c) as pool:
        futures = [pool.submit(_build, job) for job in jobs]
        builds = []
        try:
            for job, future in zip(jobs, futures, strict=True):
                try:
                    builds.append(future.result())
                except Exception as exc:
                    raise RuntimeError(
                        f"device {job.device}: build failed ({type(exc).__name__}: {exc}); "
                        f"its output is in {Path(job.directory) / 'build.log'}"
                    ) from exc
                if on_done is not None:
                    on_done(builds[-1])
        except BaseException:
            # Leaving the pool waits for every queued device: after a failed build or Ctrl-C they would
            # all be built before the error showed. Cancel the ones not started.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return builds


def finetune_options(section: FinetuneSection) -> dict[str, float | int]:
    return {
        "steps": section.steps,
        "batch_size": section.batch_size,
        "lr": section.lr,
        "lora_r": section.lora_r,
    }


def write_device_config(
    build: DeviceBuild,
    federation: str,
    mqtt: MqttConfig,
    state: Path,
    *,
    uplink_bytes_s: int = 0,
) -> Path:
    """The agent's `device.toml` (the same file a real device runs with)."""
    state.mkdir(parents=True, exist_ok=True)
    path = state / "device.toml"
    path.write_text(
        "\n".join(
            [
                "[device]",
                # Paths through toml_string: a folder name with a quote or a backslash is valid.
                f'id = "{build.job.device}"',
                f'federation = "{federation}"',
                f'hardware = "simulated {build.job.preset} on {build.job.backend}"',
                f"state_dir = {toml_string(str(state))}",
                "[model]",
                f"path = {toml_string(str(build.runtime_model))}",
                f'backend = "{build.job.backend}"',
                "threads = 1",
                "[data]",
                f"private = {toml_string(str(build.job.private))}",
                "embedding_max_texts = 48",
                "[spool]",
                f"dir = {toml_string(str(state / 'spool'))}",
                "resend_s = 20.0",
                "[uplink]",
                "status_interval_s = 1.0",
                f"rate_limit_bytes_s = {uplink_bytes_s}",
                mqtt_toml(mqtt.model_copy(update={"reconnect_min_s": 0.2, "reconnect_max_s": 2.0})),
            ]
        )
    )
    path.chmod(0o600)  # it may hold the device's MQTT password
    return path
