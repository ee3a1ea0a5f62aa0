"""The simulator's results model and report: metrics.json, report.md, the plots and the terminal table."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from deepfusion.cloud.sim.report import PLOT_FILES, console_table, gain_recovered, write_report
from deepfusion.cloud.sim.results import (
    BillRow,
    Check,
    DeviceRow,
    DomainScore,
    MethodRow,
    RealSizeRow,
    RoundPoint,
    RunResults,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# nll per (method, domain); None: the method was not measured on that domain.
NLL: dict[str, dict[str, float | None]] = {
    "base": {"code": 3.0, "medical": 3.2},
    "public-only": {"code": 2.9, "medical": None},
    "packets": {"code": 2.6, "medical": 2.9},
    "oracle": {"code": 2.55, "medical": 2.8},
    "centralized": {"code": 2.5, "medical": 2.7},
}
LABELS = {
    "base": "Base model",
    "public-only": "Public data only",
    "packets": "Packets merge",
    "oracle": "Oracle merge",
    "centralized": "Centralized training",
}


def _score(nll: float, acc: float = 0.4321) -> DomainScore:
    return DomainScore(nll=nll, ppl=math.exp(nll), acc=acc, tokens=1000)


def _scores(method: str) -> dict[str, DomainScore]:
    return {d: _score(v) for d, v in NLL[method].items() if v is not None}


def _device(name: str, domain: str, cluster: int, dropped: bool = False) -> DeviceRow:
    return DeviceRow(
        device=name,
        domain=domain,
        preset="tiny",
        architecture="llama",
        backend="torch",
        cluster=cluster,
        share_docs=12,
        finetune_val_before=3.5,
        finetune_val_after=None,
        packets=4,
        uplink_bytes=2_500_000,
        downlink_bytes=1_000,
        dropped=dropped,
        scores={domain: _score(2.75)},
    )


@pytest.fixture
def results() -> RunResults:
    rows = [
        MethodRow(
            method=m,
            label=LABELS[m],
            scores=_scores(m),
            uplink_bytes_per_device=1_234_567.0 if m == "packets" else None,
            downlink_bytes_per_device=42_000.0 if m == "packets" else None,
            wall_s=12.34 if m == "packets" else None,
        )
        for m in NLL
    ]
    return RunResults(
        run="unit",
        profile="quick",
        started_at=datetime(2025, 5, 6, 7, 8, 9, tzinfo=UTC),
        wall_s=98.7,
        domains=["code", "medical"],
        config={"seed": 0, "rounds": 2},
        rows=rows,
        devices=[_device("dev-a", "code", 0), _device("dev-b", "medical", 1, dropped=True)],
        rounds=[
            RoundPoint(round=1, method="packets", scores={"code": _score(2.8), "medical": _score(3.0)}),
            RoundPoint(round=2, method="packets", scores=_scores("packets")),
        ],
        bills=[
            BillRow(method="packets", uplink_bytes=1_234_567, downlink_bytes=42_000, rounds=2),
            BillRow(method="weight-average", uplink_bytes=270_000_000, downlink_bytes=270_000_000, rounds=2),
        ],
        real_sizes=[
            RealSizeRow(
                model="SmolLM2-135M",
                params=135_000_000,
                weight_bytes=270_000_000,
                packet_bytes=5_400_000,
                packets_over_weights=0.02,
                break_even_tokens=1_234_567,
                fedjets_bytes=54_000_000,
                packets_over_fedjets=0.1,
            )
        ],
        clusters={"dev-a": 0, "dev-b": 1},
        cluster_silhouette=0.61,
        checks=[
            Check(name="packets beat base", target="< 3.0", measured="2.6", passed=True),
            Check(name="packets near oracle", target="< 0.01 nats", measured="0.05 nats", passed=False),
        ],
        dropped_devices=["dev-b"],
    )


def _table_line(md: str, section: str, label: str) -> list[str]:
    """Cells of the row starting with `label` in the table under heading `section`."""
    body = md.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    for line in body.splitlines():
        if line.startswith(f"| {label} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row {label!r} under {section!r}")


def test_metrics_json_round_trips(results: RunResults, tmp_path: Path) -> None:
    write_report(results, tmp_path)
    loaded = RunResults.model_validate_json((tmp_path / "metrics.json").read_text())
    assert loaded == results
    assert loaded.row("packets").scores["code"].nll == 2.6


def test_report_md_tables(results: RunResults, tmp_path: Path) -> None:
    md = write_report(results, tmp_path).read_text()
    assert md.startswith("# DeepFusion simulation: unit")
    assert "quick" in md and "2025-05-06" in md and "98.7 s" in md
    for method, label in LABELS.items():
        cells = _table_line(md, "Comparison", label)
        for i, domain in enumerate(results.domains):
            nll = NLL[method][domain]
            assert cells[1 + 2 * i] == (f"{nll:.3f}" if nll is not None else "—")
    packets = _table_line(md, "Comparison", "Packets merge")
    assert packets[1:] == ["2.600", "43.2%", "2.900", "43.2%", "1.2 MB", "42.0 KB", "12.3"]
    # Missing values: public-only has no medical score, and no bytes or wall time.
    assert _table_line(md, "Comparison", "Public data only")[3:] == ["—"] * 5


def test_gain_recovered_matches_hand_computation(results: RunResults, tmp_path: Path) -> None:
    md = write_report(results, tmp_path).read_text()
    # G(code) = 3.0 - 2.5 = 0.5, G(medical) = 3.2 - 2.7 = 0.5; share = (base - row) / G.
    expected = {
        "Base model": ["0.0%", "0.0%"],
        "Public data only": ["20.0%", "—"],
        "Packets merge": ["80.0%", "60.0%"],
        "Oracle merge": ["90.0%", "80.0%"],
        "Centralized training": ["100.0%", "100.0%"],
    }
    for label, cells in expected.items():
        assert _table_line(md, "Gain recovered", label)[1:] == cells
    shares = gain_recovered(results)
    assert shares["code"]["packets"] == pytest.approx(80.0)
    assert shares["medical"]["public-only"] is None
    without_base = results.model_copy(update={"rows": [r for r in results.rows if r.method != "base"]})
    assert gain_recovered(without_base) == {}
    assert "## Gain recovered" not in write_report(without_base, tmp_path / "nobase").read_text()


def test_report_md_other_sections(results: RunResults, tmp_path: Path) -> None:
    md = write_report(results, tmp_path).read_text()
    dev_b = _table_line(md, "Devices", "dev-b")
    assert (
        dev_b[1:3] == ["medical", "tiny"]
        and dev_b[7:9] == ["3.500", "—"]
        and dev_b[-3:] == ["yes", "—", "2.750"]
    )
    merge = _table_line(md, "Merge judgement", "code")
    assert merge[1:] == ["2.600", "2.550", "—", "+0.050", "—"]
    assert _table_line(md, "Merge judgement", "mean")[4] == "+0.075"
    assert "0.075 nats worse than the oracle" in md
    assert _table_line(md, "Communication at demo size", "weight-average")[1:4] == [
        "270.0 MB",
        "270.0 MB",
        "2",
    ]
    real = _table_line(md, "Communication at real size", "SmolLM2-135M")
    assert real[1:] == ["135M", "270.0 MB", "5.4 MB", "2.0%", "1,234,567", "54.0 MB", "10.0%"]
    assert _table_line(md, "Checks", "packets beat base")[-1] == "✓"
    assert _table_line(md, "Checks", "packets near oracle")[-1] == "✗"
    assert "1 of 2 passed" in md
    assert "`dev-b`" in md.split("## Dropped devices", 1)[1]
    assert "## Scale" not in md
    for name in PLOT_FILES:
        assert f"(plots/{name})" in md


def test_plots_are_real_pngs(results: RunResults, tmp_path: Path) -> None:
    write_report(results, tmp_path)
    for name in PLOT_FILES:
        path = tmp_path / "plots" / name
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 5_000, name
        image = _imread(path)
        colours = np.unique(image.reshape(-1, image.shape[-1]), axis=0)
        assert len(colours) > 2, name


def _pixels(path: Path, colour: str) -> int:
    from matplotlib.colors import to_rgb

    image = np.asarray(_imread(path))[..., :3]
    return int((np.abs(image - np.array(to_rgb(colour))).max(axis=-1) < 0.05).sum())


def _imread(path: Path) -> np.ndarray:
    import matplotlib.image

    return np.asarray(matplotlib.image.imread(path))


def test_plots_draw_the_data(results: RunResults, tmp_path: Path) -> None:
    write_report(results, tmp_path)
    plots = tmp_path / "plots"
    # Default colour cycle: C0 is the first series, C1 the second; olive is the public-only reference.
    assert _pixels(plots / "perplexity_by_round.png", "C0") > 1_000  # the packets curves, both domains
    assert _pixels(plots / "perplexity_by_round.png", "tab:olive") > 150  # its dashed line
    assert _pixels(plots / "bytes_per_device.png", "C0") > 10_000  # uplink bars
    assert _pixels(plots / "bytes_per_device.png", "C1") > 10_000  # downlink bars
    assert _pixels(plots / "clusters.png", "C0") > 100 and _pixels(plots / "clusters.png", "C1") > 100


def test_empty_run_still_writes_everything(tmp_path: Path) -> None:
    empty = RunResults(
        run="empty",
        profile="quick",
        started_at=datetime(2025, 1, 1, tzinfo=UTC),
        wall_s=0.0,
        domains=[],
        config={},
        rows=[],
        devices=[],
        rounds=[],
        bills=[],
        real_sizes=[],
        clusters={},
    )
    md = write_report(empty, tmp_path).read_text()
    assert "## Comparison" in md and "## Gain recovered" not in md and "## Merge judgement" not in md
    assert all((tmp_path / "plots" / name).read_bytes()[:8] == PNG_MAGIC for name in PLOT_FILES)


def test_console_table(results: RunResults) -> None:
    console = Console(record=True, width=250)
    console.print(console_table(results))
    text = console.export_text()
    for label in LABELS.values():
        assert label in text
    assert "2.600" in text and "1.2 MB" in text and "—" in text


def test_row_lookup(results: RunResults) -> None:
    assert results.row("oracle").label == "Oracle merge"
    with pytest.raises(KeyError, match="nope"):
        results.row("nope")


def test_gain_share_is_missing_when_centralized_does_not_gain(results: RunResults, tmp_path: Path) -> None:
    # G(code) = 3.0 - 3.1 < 0: dividing by it would show the packets row (better than base) as -100% and a
    # row worse than base as a positive share; the acceptance checks treat G <= 0 as "no share" too.
    rows = [
        r.model_copy(update={"scores": {**r.scores, "code": _score(3.1)}}) if r.method == "centralized" else r
        for r in results.rows
    ]
    flat = results.model_copy(update={"rows": rows})
    shares = gain_recovered(flat)
    assert all(shares["code"][m] is None for m in NLL)
    assert shares["medical"]["packets"] == pytest.approx(60.0)  # the other domain is untouched
    md = write_report(flat, tmp_path).read_text()
    assert _table_line(md, "Gain recovered", "Packets merge")[1:] == ["—", "60.0%"]


def test_acceptance_checks_say_when_centralized_does_not_gain(results: RunResults) -> None:
    from deepfusion.cloud.sim.run import acceptance_checks

    rows = [
        r.model_copy(update={"scores": {**r.scores, "code": _score(3.1)}}) if r.method == "centralized" else r
        for r in results.rows
    ]
    checks = {c.name: c for c in acceptance_checks(results.model_copy(update={"rows": rows}))}
    # No share of a gain that does not exist: the share targets fail, visibly, instead of vanishing.
    assert not checks["code: centralized training gains (G > 0)"].passed
    assert checks["code: centralized training gains (G > 0)"].measured == "G = -0.100"
    assert not any(name.startswith("code: packets recover") for name in checks)
    assert checks["medical: packets recover ≥ 50% of G"].passed
    assert checks["medical: packets recover ≥ 50% of G"].measured == "60.0%"
    assert "medical: centralized training gains (G > 0)" not in checks


def test_bytes_plot_floor_is_below_the_smallest_bar(results: RunResults, tmp_path: Path) -> None:
    # The demo's bills: 144 KB downlink next to 7.3 MB uplinks and a 0 B downlink. With the log axis
    # autoscaled to the smallest bar, that bar got 0.1 of 3.6 decades (about 1,100 px) and read as 0 B.
    bills = [
        BillRow(method="packets", uplink_bytes=7_330_643, downlink_bytes=144_023, rounds=1),
        BillRow(method="paper", uplink_bytes=8_481_184, downlink_bytes=0, rounds=1),
    ]
    write_report(results.model_copy(update={"bills": bills}), tmp_path)
    assert _pixels(tmp_path / "plots" / "bytes_per_device.png", "C1") > 4_000  # a decade and more of bar


def test_sizes_at_a_unit_boundary_roll_over_to_the_next_unit(results: RunResults, tmp_path: Path) -> None:
    bills = [BillRow(method="packets", uplink_bytes=999_960, downlink_bytes=999.7, rounds=1)]
    real = [results.real_sizes[0].model_copy(update={"params": 999_600_000, "weight_bytes": 999_950_000})]
    md = write_report(results.model_copy(update={"bills": bills, "real_sizes": real}), tmp_path).read_text()
    # Not "1000.0 KB" / "1000 B", "1e+03M" / "1000.0 MB".
    assert _table_line(md, "Communication at demo size", "packets")[1:3] == ["1.0 MB", "1.0 KB"]
    assert _table_line(md, "Communication at real size", "SmolLM2-135M")[1:3] == ["1B", "1.0 GB"]


def test_acceptance_checks_skip_a_failed_baseline(results: RunResults, tmp_path: Path) -> None:
    from deepfusion.cloud.sim.run import acceptance_checks

    # A baseline that fails gets a row with no scores (simulate_run); reading its score per domain raised
    # KeyError, so the run ended in a traceback before the report that names the failure was written.
    failed = MethodRow(method="logit-kd", label="logit-only KD", scores={}, note="failed: out of memory")
    with_failed = results.model_copy(update={"rows": [*results.rows, failed], "checks": []})
    checks = {c.name: c for c in acceptance_checks(with_failed)}
    assert not any("logit-only KD" in name for name in checks)
    assert checks["code: packets recover ≥ 50% of G"].measured == "80.0%"
    with_failed.checks = list(checks.values())
    md = write_report(with_failed, tmp_path).read_text()
    assert _table_line(md, "Comparison", "logit-only KD")[1:] == ["—"] * 7
    assert "failed: out of memory" in md
