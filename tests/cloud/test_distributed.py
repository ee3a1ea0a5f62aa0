"""`torchrun --nproc-per-node 2` (gloo, CPU): one student per rank and FSDP phase III, against the same
`train` command in one process, on the same tiny round."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from deepfusion.shared.messages import Metrics, decode_message  # noqa: E402
from deepfusion.shared.topics import metrics_topic  # noqa: E402
from tests.cloud.tiny import FED, tiny_student  # noqa: E402
from tests.fixtures.broker import Inbox  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.mqtt]
BIN = Path(sys.executable).parent


def _run(command: list[str], store: Path, broker, args: list[str], log: Path) -> None:
    sets = [f"federation={FED}", f'store.uri="{store}"', f"mqtt.port={broker.port}", 'mqtt.host="127.0.0.1"']
    full = [*command, "train", *args, *(a for s in sets for a in ("--set", s))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        done = subprocess.run(full, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=600, check=False)
    assert done.returncode == 0, log.read_text()[-4000:]


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
