"""The default demo (`make demo`), end to end, and the quality claims it must keep (about 15 minutes).

The thresholds are the ones the method has to clear on fixed test windows, not tuned numbers: the
federated MoE must beat the base it started from and the public-only control on both domains, and its
upload must stay a small fraction of a weight upload at a real model size.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from deepfusion.cloud.sim.results import RunResults
from tests.e2e.simulate import simulate, tail


@pytest.mark.slow
@pytest.mark.mqtt
def test_default_demo_federation_beats_base_and_public_only_control(tmp_path: Path) -> None:
    result = simulate("--out", str(tmp_path), timeout=2400)
    assert result.returncode == 0, tail(result)
    results = RunResults.model_validate_json((tmp_path / "demo" / "metrics.json").read_text())
    assert len(results.devices) == 8 and not results.dropped_devices
    assert len({d.architecture for d in results.devices}) >= 3
    assert len({d.backend for d in results.devices}) >= 2
    packets, base, control = (results.row(m) for m in ("packets", "base", "public-only"))
    for domain in ("medical", "finance"):
        assert packets.scores[domain].nll < base.scores[domain].nll, domain
        assert packets.scores[domain].nll < control.scores[domain].nll, domain
    smollm2 = next(r for r in results.real_sizes if r.model.startswith("SmolLM2"))
    assert smollm2.packets_over_weights < 0.10
    assert all(row.scores for row in results.rows), [r.method for r in results.rows if not r.scores]
