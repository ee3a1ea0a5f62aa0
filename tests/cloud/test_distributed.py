"""`torchrun --nproc-per-node 2` (gloo, CPU): one student per rank and FSDP phase III, against the same
`train` command in one process, on the same tiny round; and phase III alone over spawned gloo ranks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402
from torch import multiprocessing  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from deepfusion.cloud.distributed import Ranks  # noqa: E402
from deepfusion.cloud.merge import Architecture, MergeSpec, merge_students_into_moe  # noqa: E402
from deepfusion.cloud.trainer import TrainSpec, tune_moe  # noqa: E402
from deepfusion.shared.messages import Metrics, decode_message  # noqa: E402
from deepfusion.shared.topics import metrics_topic  # noqa: E402
from tests.cloud.tiny import FED, tiny_student  # noqa: E402
from tests.fixtures.broker import Inbox  # noqa: E402

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _run(command: list[str], store: Path, broker, args: list[str], log: Path) -> None:
    sets = [f"federation={FED}", f'store.uri="{store}"', f"mqtt.port={broker.port}", 'mqtt.host="127.0.0.1"']
    full = [*command, "train", *args, *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        done = subprocess.run(full, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=600, check=False)
    assert done.returncode == 0, log.read_text()[-4000:]


@pytest.mark.mqtt
def test_two_ranks_train_the_release_one_process_trains(
    round_store: str, tokenizer_dir: Path, texts: dict[str, list[str]], broker, mqtt_client, tmp_path: Path
) -> None:
    base = tmp_path / "base"
    tiny_student(len(AutoTokenizer.from_pretrained(tokenizer_dir))).save_pretrained(base)
    heldout = tmp_path / "medical.txt"
    heldout.write_text("\n".join(t.replace("\n", " ") for t in texts["heldout"]))
    args = [
        *("--round", "0", "--base", str(base), "--tokenizer", str(tokenizer_dir)),
        *("--steps", "10", "--batch-size", "4", "--lr", "3e-3", "--alpha", "0.1"),
        *("--tune-steps", "10", "--tune-beta", "1.0", "--eval-tokens", "96", "--eval", f"medical={heldout}"),
    ]
    inbox = Inbox()
    mqtt_client(broker.config(), "watcher").subscribe(metrics_topic(FED), inbox)
    stores = {name: tmp_path / name for name in ("single", "torchrun")}
    for store in stores.values():
        shutil.copytree(round_store, store)
    _run(
        [sys.executable, "-m", "deepfusion.cloud.cli"],
        stores["single"],
        broker,
        args,
        tmp_path / "single.log",
    )
    single = len(inbox.wait_until(lambda ms: any(b'"release"' in m.payload for m in ms), 30))
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "deepfusion.cloud.cli"]
    _run(torchrun, stores["torchrun"], broker, args, tmp_path / "torchrun.log")
    metrics = [
        decode_message(Metrics, m.payload)
        for m in inbox.wait_until(lambda ms: sum(b'"release"' in m.payload for m in ms) == 2, 30)
    ]
    runs = {"single": metrics[:single], "torchrun": metrics[single:]}

    def losses(run: str, phase: str) -> dict[int, float]:
        return {m.step: m.values["loss"] for m in runs[run] if m.phase == phase}

    for cluster in (0, 1):  # each student trained alone on its rank: the same steps, the same losses
        phase = f"phase II cluster {cluster}"
        assert losses("torchrun", phase) == pytest.approx(losses("single", phase), abs=1e-6)
        student = f"{FED}/rounds/0/students/{cluster}/model.safetensors"
        one, two = (load_file(stores[name] / student) for name in ("single", "torchrun"))
        for key, value in one.items():
            torch.testing.assert_close(two[key], value, rtol=0, atol=1e-6, msg=key)
    # Phase III sharded over 2 ranks, each on half of every batch, gradients averaged.
    tuned = losses("torchrun", "phase III")
    assert tuned and tuned == pytest.approx(losses("single", "phase III"), rel=1e-4)
    release = {r: next(m for m in runs[r] if m.phase == "release").values["medical.nll"] for r in runs}
    assert release["torchrun"] == pytest.approx(release["single"], abs=1e-3)
    assert (stores["torchrun"] / FED / "releases" / "r0" / "model" / "config.json").is_file()


def _tune(ranks: Ranks, architecture: Architecture) -> dict[str, Any]:
    """Phase III of a tiny two-student merge on batches of 2 public windows: losses and router biases."""
    torch.set_num_threads(1)
    merge = MergeSpec(split=2, architecture=architecture, router_init_std=0.5)
    moe = merge_students_into_moe([tiny_student(64), tiny_student(64)], merge)
    public = [np.random.default_rng(w).integers(1, 64, 11) for w in range(2)]
    spec = TrainSpec(merge=merge, tune_steps=3, bias_update=0.05 if architecture == "deepseek_v3" else 0.0)
    losses = tune_moe(moe, public, spec, ranks=ranks)
    state = ranks.full_state(moe)
    return {"losses": losses, "biases": [v.tolist() for k, v in state.items() if "correction_bias" in k]}


def _rank(rank: int, world: int, port: int, architecture: Architecture, out: Path) -> None:
    """One spawned rank of `_tune`; rank 0 writes the result to `out`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    ranks = Ranks.from_env()
    try:
        result = _tune(ranks, architecture)
        if ranks.main:
            out.write_text(json.dumps(result))
    finally:
        ranks.close()


def _spawned(world: int, architecture: Architecture, tmp_path: Path) -> dict[str, Any]:
    """`_tune` over `world` spawned gloo ranks."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out = tmp_path / f"{architecture}-{world}.json"
    multiprocessing.spawn(_rank, args=(world, port, architecture, out), nprocs=world)
    return cast(dict[str, Any], json.loads(out.read_text()))


@pytest.mark.parametrize("architecture", ["qwen2_moe", "deepseek_v3"])
def test_ranks_left_without_sequences_by_a_small_batch_change_nothing(
    architecture: Architecture, tmp_path: Path
) -> None:
    """2 sequences over 3 ranks leave one rank without any: it crashed (an empty slice is no index, and
    the MoE cannot run on zero sequences) and took the others down. It must still join FSDP's
    collectives, yet add nothing: no loss, no load-balancing loss, no expert load to the bias update
    (DeepSeek-V3). So 3 ranks train as 2 ranks with one sequence each do."""
    idle, busy = (_spawned(world, architecture, tmp_path) for world in (3, 2))
    assert idle["losses"] == pytest.approx(busy["losses"], rel=1e-5)
    assert idle["biases"] == busy["biases"]


def _cpu_rank_beside_a_gpu(rank: int, world: int, port: int, out: Path) -> None:
    """A `--device cpu` rank on a machine where torch sees a GPU: it must join with gloo, which reduces
    CPU tensors (NCCL would refuse them, and a CPU-only torch has no NCCL at all)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.cuda.is_available = lambda: True  # the machine "has" a GPU; this spawned process only
    ranks = Ranks.from_env(torch.device("cpu"))
    try:
        mean = ranks.mean(float(rank))
        if ranks.main:
            out.write_text(json.dumps({"backend": torch.distributed.get_backend(), "mean": mean}))
    finally:
        ranks.close()


def test_ranks_training_on_the_cpu_use_gloo_even_where_a_gpu_is_seen(tmp_path: Path) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out = tmp_path / "ranks.json"
    multiprocessing.spawn(_cpu_rank_beside_a_gpu, args=(2, port, out), nprocs=2)
    assert json.loads(out.read_text()) == {"backend": "gloo", "mean": 0.5}
