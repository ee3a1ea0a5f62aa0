"""`deepfusion-cloud simulate --preset real` at smoke size on CPU: the GPU profile's own code paths (the real
SmolLM2-135M on torch and on llama.cpp, its 49k tokenizer, the SmolLM2-shaped student and MoE) run end to
end. Every size is cut down (4 fine-tune steps, 48 public windows of 64 tokens, 4 student steps, a
2-step student base) so it takes about 4 minutes; the quality of this profile is a GPU run's business."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("llama_cpp")

from transformers import AutoConfig, AutoTokenizer

from deepfusion.cloud.rounds import RoundState
from deepfusion.cloud.sim.results import RunResults
from tests.e2e.simulate import simulate, tail

SMOKE = {
    "data.public_windows": 48, "data.max_tokens": 64, "data.test_windows": 8,
    "finetune.steps": 4, "finetune.batch_size": 2,
    "student.steps": 4, "student.batch_size": 2, "student.pretrain_steps": 2,
    "moe.tune_steps": 2,
}  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.CompletedProcess[str], Path]]:
    out = tmp_path_factory.mktemp("results")
    overrides = [a for key, value in SMOKE.items() for a in ("--set", f"{key}={value}")]
    result = simulate(
        *("--preset", "real", "--devices", "4", "--no-baselines", "--out", str(out), *overrides), timeout=1200
    )
    yield result, out / "real"
    shutil.rmtree(out, ignore_errors=True)  # about 6 GB: four merged SmolLM2 checkpoints and their GGUFs


@pytest.mark.slow
@pytest.mark.mqtt
def test_real_profile_runs_end_to_end_on_smollm2_devices(
    run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    result, out = run
    assert result.returncode == 0, tail(result)
    results = RunResults.model_validate_json((out / "metrics.json").read_text())
    devices = {row.device: row for row in results.devices}
    assert {row.preset for row in devices.values()} == {"smollm2-135m"}
    assert {row.backend for row in devices.values()} == {"torch", "llama_cpp"}
    assert all(row.packets > 0 for row in devices.values())
    # The real model knows English: each device alone is far below the barely trained student.
    base = results.row("base")
    for name, row in devices.items():
        for domain in ("medical", "finance"):
            assert row.scores[domain].nll < base.scores[domain].nll - 3, (name, domain)
    # Devices of one domain share a cluster (their data embeddings come from the real model).
    clusters = {
        domain: {r.cluster for r in devices.values() if r.domain == domain}
        for domain in ("medical", "finance")
    }
    assert all(len(c) == 1 for c in clusters.values()) and clusters["medical"] != clusters["finance"]

    state = RoundState.model_validate_json(
        (out / "store" / "real" / "rounds" / "0" / "state.json").read_text()
    )
    assert state.status == "closed" and state.release == "r0"
    # Phase II and III moved the release off the student base even at four steps.
    packets = results.row("packets")
    for domain in ("medical", "finance"):
        assert packets.scores[domain].nll < base.scores[domain].nll, domain

    config = AutoConfig.from_pretrained(out / "release")
    tokenizer = AutoTokenizer.from_pretrained(out / "release")
    assert config.architectures == ["Qwen2MoeForCausalLM"]
    assert config.hidden_size == 576 and config.num_experts == 4  # 2 students x split 2
    assert config.vocab_size == len(tokenizer) == 49152  # SmolLM2's own tokenizer
