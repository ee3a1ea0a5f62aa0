"""Report of one simulation run: `metrics.json`, `report.md`, PNG plots, and the terminal table.

    path = write_report(results, Path("results/demo"))   # -> results/demo/report.md
    Console().print(console_table(results))

matplotlib is imported only when plots are drawn, so importing this module stays light. Missing values
show as "—"; nll is in nats per token (3 decimals), token accuracy in % (1 decimal), bytes in decimal
units ("1.2 MB").
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table

from deepfusion.cloud.sim.results import DomainScore, MethodRow, RoundPoint, RunResults

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["MISSING", "PLOT_FILES", "console_table", "gain_recovered", "render_markdown", "write_report"]

MISSING = "—"
PLOT_FILES = ("perplexity_by_round.png", "bytes_per_device.png", "clusters.png")
# Single-valued methods drawn as dashed reference lines over the per-round curves.
_REFERENCE_METHODS = ("base", "public-only", "centralized")
_REFERENCE_COLOURS = {"base": "0.35", "public-only": "tab:olive", "centralized": "black"}
_MERGES = ("packets", "oracle", "weight-average")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_DPI = 120


# ---------------------------------------------------------------- formatting


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _nll(x: float | None) -> str:
    return f"{x:.3f}" if x is not None and _finite(x) else MISSING


def _acc(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None and _finite(x) else MISSING


def _pct(x: float | None) -> str:
    return f"{x:.1f}%" if x is not None and _finite(x) else MISSING


def _ratio_pct(x: float | None) -> str:
    """A ratio as a percentage; small ratios keep two significant digits instead of rounding to 0.0%."""
    if x is None or not _finite(x):
        return MISSING
    v = 100 * x
    return f"{v:.1f}%" if abs(v) >= 1 or v == 0 else f"{v:.2g}%"


def _signed(x: float | None) -> str:
    return f"{x:+.3f}" if x is not None and _finite(x) else MISSING


def _seconds(x: float | None) -> str:
    return f"{x:.1f}" if x is not None and _finite(x) else MISSING


def _bytes(n: float | None) -> str:
    """Human-readable decimal size: 999 B, 1.2 KB, 3.4 MB, 5.6 GB, 7.8 TB."""
    if n is None or not _finite(n):
        return MISSING
    value = float(n)
    if abs(value) < 999.5:  # what rounds to "1000 B" is "1.0 KB"
        return f"{value:.0f} B"
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1000
        if abs(value) < 999.95 or unit == "TB":  # likewise "1000.0 KB" is "1.0 MB"
            break
    return f"{value:.1f} {unit}"


def _count(n: int | None) -> str:
    """Parameter counts: 135M, 1.7B."""
    if n is None:
        return MISSING
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= 0.9995 * scale:  # 999.6M at 3 digits is "1B", not "1e+03M"
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _score(scores: dict[str, DomainScore], domain: str) -> DomainScore | None:
    return scores.get(domain)


def _md_cell(text: str) -> str:
    # A literal "|" would split the markdown cell.
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


# ---------------------------------------------------------------- main table


def _main_header(domains: Sequence[str]) -> list[str]:
    per_domain = [f"{d} {what}" for d in domains for what in ("log-ppl", "token acc")]
    return ["method", *per_domain, "uplink/device", "downlink/device", "wall s"]


def _main_cells(row: MethodRow, domains: Sequence[str]) -> list[str]:
    cells = [row.label]
    for domain in domains:
        score = _score(row.scores, domain)
        cells += [_nll(score.nll if score else None), _acc(score.acc if score else None)]
    return [
        *cells,
        _bytes(row.uplink_bytes_per_device),
        _bytes(row.downlink_bytes_per_device),
        _seconds(row.wall_s),
    ]


def console_table(results: RunResults) -> Table:
    """The main comparison table, for the terminal."""
    table = Table(title=f"DeepFusion simulation {results.run} ({results.profile})")
    for i, name in enumerate(_main_header(results.domains)):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in results.rows:
        table.add_row(*_main_cells(row, results.domains))
    return table


# ---------------------------------------------------------------- derived numbers


def gain_recovered(results: RunResults) -> dict[str, dict[str, float | None]]:
    """Per domain, per method: share in % of the base -> centralized nll gain, (base - row) / G * 100.

    Empty when the run lacks the base or the centralized row; None where a score is missing or G <= 0
    (centralized training gained nothing, so there is no gain to share: dividing by a negative G would
    flip every sign), as in the acceptance checks.
    """
    if not (results.has_row("base") and results.has_row("centralized")):
        return {}
    base, central = results.row("base"), results.row("centralized")
    out: dict[str, dict[str, float | None]] = {}
    for domain in results.domains:
        b, c = _score(base.scores, domain), _score(central.scores, domain)
        gain = b.nll - c.nll if b and c else 0.0
        shares: dict[str, float | None] = {}
        for row in results.rows:
            s = _score(row.scores, domain)
            shares[row.method] = 100 * (b.nll - s.nll) / gain if b and s and gain > 0 else None
        out[domain] = shares
    return out


def _nll_of(results: RunResults, method: str, domain: str) -> float | None:
    if not results.has_row(method):
        return None
    score = _score(results.row(method).scores, domain)
    return score.nll if score else None


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


# ---------------------------------------------------------------- report.md sections


def _title(results: RunResults) -> list[str]:
    started = results.started_at.isoformat(sep=" ", timespec="seconds")
    lines = [
        f"# DeepFusion simulation: {results.run}",
        "",
        f"Profile **{results.profile}** · started {started} · wall time {_seconds(results.wall_s)} s"
        f" · domains: {', '.join(results.domains) or MISSING}",
        "",
    ]
    if results.release:
        lines += [f"Release: `{results.release}`", ""]
    return lines


def _main_section(results: RunResults) -> list[str]:
    lines = [
        "## Comparison",
        "",
        "Test log-perplexity (nll, nats per token; lower is better) and token accuracy per domain.",
        "",
    ]
    lines += _md_table(_main_header(results.domains), (_main_cells(r, results.domains) for r in results.rows))
    notes = [f"- **{r.label}**: {r.note}" for r in results.rows if r.note]
    return lines + ([*notes, ""] if notes else [])


def _gain_section(results: RunResults) -> list[str]:
    shares = gain_recovered(results)
    if not shares:
        return []
    base, central = results.row("base"), results.row("centralized")
    gains = []
    for d in results.domains:
        b, c = _score(base.scores, d), _score(central.scores, d)
        gains.append(f"{d} {_nll(b.nll - c.nll) if b and c else MISSING}")
    lines = [
        "## Gain recovered",
        "",
        "Share of the base → centralized gain G = nll(base) − nll(centralized) that each method recovers,"
        " (nll(base) − nll(method)) / G. G in nats: " + ", ".join(gains) + ".",
        "",
    ]
    header = ["method", *(f"{d} gain recovered" for d in results.domains)]
    rows = ([r.label, *(_pct(shares[d][r.method]) for d in results.domains)] for r in results.rows)
    return lines + _md_table(header, rows)


def _device_section(results: RunResults) -> list[str]:
    if not results.devices:
        return []
    header = [
        "device",
        "domain",
        "preset",
        "architecture",
        "backend",
        "cluster",
        "share docs",
        "fine-tune val before",
        "fine-tune val after",
        "packets",
        "uplink",
        "downlink",
        "dropped",
        *(f"{d} log-ppl" for d in results.domains),
    ]
    rows = []
    for dev in results.devices:
        cluster = dev.cluster if dev.cluster is not None else results.clusters.get(dev.device)
        own = [_score(dev.scores, d) for d in results.domains]
        rows.append(
            [
                dev.device,
                dev.domain,
                dev.preset,
                dev.architecture,
                dev.backend,
                MISSING if cluster is None else str(cluster),
                str(dev.share_docs),
                _nll(dev.finetune_val_before),
                _nll(dev.finetune_val_after),
                str(dev.packets),
                _bytes(dev.uplink_bytes),
                _bytes(dev.downlink_bytes),
                "yes" if dev.dropped else "no",
                *(_nll(s.nll if s else None) for s in own),
            ]
        )
    lines = ["## Devices", "", *_md_table(header, rows)]
    if results.cluster_silhouette is not None:
        lines += [f"Cluster silhouette: {results.cluster_silhouette:.3f}.", ""]
    return lines


def _merge_section(results: RunResults) -> list[str]:
    if not results.has_row("packets") or not any(results.has_row(m) for m in _MERGES[1:]):
        return []
    per_domain = []
    for d in results.domains:
        p, o, w = (_nll_of(results, m, d) for m in _MERGES)
        per_domain.append((d, p, o, w, _diff(p, o), _diff(p, w)))
    vs_oracle = _mean(r[4] for r in per_domain)
    vs_average = _mean(r[5] for r in per_domain)
    header = [
        "domain",
        "packets nll",
        "oracle nll",
        "weight-average nll",
        "packets − oracle",
        "packets − weight-average",
    ]
    rows = [[d, _nll(p), _nll(o), _nll(w), _signed(po), _signed(pw)] for d, p, o, w, po, pw in per_domain]
    rows.append(["mean", MISSING, MISSING, MISSING, _signed(vs_oracle), _signed(vs_average)])
    return [
        "## Merge judgement",
        "",
        "Differences in nats per token; positive means the packet merge is worse.",
        "",
        *_md_table(header, rows),
        _judgement(vs_oracle, vs_average),
        "",
    ]


def _judgement(vs_oracle: float | None, vs_average: float | None) -> str:
    parts = []
    if vs_oracle is not None:
        parts.append(f"{abs(vs_oracle):.3f} nats {'worse' if vs_oracle > 0 else 'better'} than the oracle")
    if vs_average is not None:
        word = "worse" if vs_average > 0 else "better"
        parts.append(f"{abs(vs_average):.3f} nats {word} than weight averaging")
    if not parts:
        return "No domain has both the packet merge and a reference merge scored."
    return "On average over domains the packet merge is " + " and ".join(parts) + "."


def _bills_section(results: RunResults) -> list[str]:
    lines: list[str] = []
    if results.bills:
        header = ["method", "uplink/device", "downlink/device", "rounds", "note"]
        rows = [
            [b.method, _bytes(b.uplink_bytes), _bytes(b.downlink_bytes), str(b.rounds), b.note or MISSING]
            for b in results.bills
        ]
        lines += ["## Communication at demo size", "", *_md_table(header, rows)]
    if results.real_sizes:
        header = [
            "model",
            "params",
            "weights",
            "packets",
            "packets/weights",
            "break-even tokens",
            "FedJETS",
            "packets/FedJETS",
        ]
        rows = [
            [
                r.model,
                _count(r.params),
                _bytes(r.weight_bytes),
                _bytes(r.packet_bytes),
                _ratio_pct(r.packets_over_weights),
                f"{r.break_even_tokens:,.0f}",
                _bytes(r.fedjets_bytes),
                _ratio_pct(r.packets_over_fedjets),
            ]
            for r in results.real_sizes
        ]
        lines += ["## Communication at real size", "", *_md_table(header, rows)]
    return lines


def _scale_section(results: RunResults) -> list[str]:
    if not results.scale:
        return []
    header = ["devices", "uplink/device", "wall s", "packets"]
    rows = [
        [str(p.devices), _bytes(p.uplink_bytes_per_device), _seconds(p.wall_s), str(p.packets)]
        for p in results.scale
    ]
    return ["## Scale", "", *_md_table(header, rows)]


def _checks_section(results: RunResults) -> list[str]:
    if not results.checks:
        return []
    passed = sum(c.passed for c in results.checks)
    header = ["check", "target", "measured", "passed"]
    rows = [[c.name, c.target, c.measured, "✓" if c.passed else "✗"] for c in results.checks]
    return ["## Checks", "", f"{passed} of {len(results.checks)} passed.", "", *_md_table(header, rows)]


def _dropped_section(results: RunResults) -> list[str]:
    flagged = [d.device for d in results.devices if d.dropped]
    dropped = list(dict.fromkeys([*results.dropped_devices, *flagged]))
    body = ", ".join(f"`{d}`" for d in dropped) if dropped else "none"
    return ["## Dropped devices", "", body, ""]


def _screening_section(results: RunResults) -> list[str]:
    """Which devices the trainer quarantined, and the hostile one when the run had one."""
    lines = ["## Teacher screening", ""]
    if results.hostile_device:
        lines += [f"Hostile device (poisoned packets): `{results.hostile_device}`.", ""]
    if not results.quarantined:
        return [*lines, "No device quarantined.", ""]
    rows = [[f"`{d}`", reason] for d, reason in sorted(results.quarantined.items())]
    return [*lines, *_md_table(["quarantined", "why"], rows), ""]


def _plots_section() -> list[str]:
    lines = ["## Plots", ""]
    for name in PLOT_FILES:
        title = name.removesuffix(".png").replace("_", " ")
        lines += [f"![{title}](plots/{name})", ""]
    return lines


def _config_section(results: RunResults) -> list[str]:
    if not results.config:
        return []
    text = json.dumps(results.config, indent=1, sort_keys=True, default=str)
    return ["## Configuration", "", "```json", text, "```", ""]


def render_markdown(results: RunResults) -> str:
    """The text of report.md."""
    sections = (
        _title,
        _main_section,
        _gain_section,
        _device_section,
        _merge_section,
        _bills_section,
        _scale_section,
        _checks_section,
        _dropped_section,
        _screening_section,
    )
    lines = [line for section in sections for line in section(results)]
    return "\n".join([*lines, *_plots_section(), *_config_section(results)]).rstrip() + "\n"


# ---------------------------------------------------------------- plots


@contextmanager
def _figure(path: Path, ncols: int, size: tuple[float, float]) -> Iterator[list[Axes]]:
    """Axes of a fresh 1 x ncols figure, saved to `path` on exit and always closed."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the simulator runs headless
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=size, squeeze=False)
    try:
        yield list(axes[0])
        fig.tight_layout()
        fig.savefig(path, dpi=_DPI)
    finally:
        plt.close(fig)


def _label(results: RunResults, method: str) -> str:
    return results.row(method).label if results.has_row(method) else method


def _round_series(results: RunResults) -> dict[str, list[RoundPoint]]:
    series: dict[str, list[RoundPoint]] = {}
    for point in results.rounds:
        series.setdefault(point.method, []).append(point)
    return {m: sorted(points, key=lambda p: p.round) for m, points in series.items()}


def _plot_rounds(results: RunResults, path: Path) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    domains = results.domains or ["(no domain)"]
    series = _round_series(results)
    with _figure(path, len(domains), (4.8 * len(domains), 3.8)) as axes:
        for ax, domain in zip(axes, domains, strict=True):
            for method, points in series.items():
                xs = [p.round for p in points if domain in p.scores]
                ys = [p.scores[domain].nll for p in points if domain in p.scores]
                ax.plot(xs, ys, marker="o", label=_label(results, method))
            for method in _REFERENCE_METHODS:
                nll = _nll_of(results, method, domain)
                if nll is not None:
                    colour = _REFERENCE_COLOURS[method]
                    ax.axhline(nll, linestyle="--", color=colour, label=_label(results, method))
            ax.set_title(domain)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            # Round -1 is the model before federation (the base).
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: "before" if x < 0 else f"{x:.0f}"))
            ax.set_xlabel("round")
            ax.set_ylabel("test log-perplexity (nats/token)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")


def _plot_bills(results: RunResults, path: Path) -> None:
    bills = results.bills
    with _figure(path, 1, (max(5.0, 1.3 * len(bills) + 2), 4.0)) as (ax,):
        if not bills:
            ax.text(0.5, 0.5, "no communication bills", ha="center", va="center", transform=ax.transAxes)
            return
        xs = range(len(bills))
        width = 0.38
        for offset, name, values in (
            (-width / 2, "uplink", [b.uplink_bytes for b in bills]),
            (width / 2, "downlink", [b.downlink_bytes for b in bills]),
        ):
            bars = ax.bar([x + offset for x in xs], values, width, label=name)
            ax.bar_label(bars, labels=[_bytes(v) for v in values], fontsize="x-small", rotation=90, padding=2)
        # A log axis with no positive value warns and shows nothing; such a bill stays linear.
        positive = [v for b in bills for v in (b.uplink_bytes, b.downlink_bytes) if v > 0]
        if positive:
            ax.set_yscale("log")
            # Bars start at the axis floor: a decade below the smallest bar, so it does not shrink to a
            # sliver that reads as 0 B next to the bars that are 0 B; headroom above for the size labels.
            bottom = 10 ** (math.floor(math.log10(min(positive))) - 1)
            ax.set_ylim(bottom=bottom, top=max(positive) * 30)
        ax.set_xticks(list(xs), [b.method for b in bills], rotation=30, ha="right")
        ax.set_ylabel("bytes per device")
        ax.set_title("communication per device")
        ax.legend(fontsize="small")


def _plot_clusters(results: RunResults, path: Path) -> None:
    domain_of = {d.device: d.domain for d in results.devices}
    cluster_of = {d.device: d.cluster for d in results.devices if d.cluster is not None} | results.clusters
    devices = [*domain_of, *(d for d in cluster_of if d not in domain_of)]
    domains = list(dict.fromkeys(domain_of.get(d, "unknown") for d in devices))
    with _figure(path, 1, (max(5.0, 0.5 * len(devices) + 2), 3.8)) as (ax,):
        for i, domain in enumerate(domains):
            mine = [
                x for x, d in enumerate(devices) if domain_of.get(d, "unknown") == domain and d in cluster_of
            ]
            if mine:
                ys = [cluster_of[devices[x]] for x in mine]
                ax.scatter(mine, ys, s=60, marker=_MARKERS[i % len(_MARKERS)], label=domain)
        ax.set_xticks(range(len(devices)), devices, rotation=45, ha="right", fontsize="small")
        clusters = sorted(set(cluster_of.values())) or [0]
        ax.set_yticks(clusters)
        ax.set_ylim(clusters[0] - 0.5, clusters[-1] + 0.5)
        ax.set_xlim(-0.5, max(len(devices), 1) - 0.5)
        ax.set_xlabel("device")
        ax.set_ylabel("cluster")
        title = "device clusters"
        if results.cluster_silhouette is not None:
            title += f" (silhouette {results.cluster_silhouette:.2f})"
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if domains:
            ax.legend(title="domain", fontsize="small")


# ---------------------------------------------------------------- entry point


def write_report(results: RunResults, out_dir: Path) -> Path:
    """Write metrics.json, report.md and plots/*.png into `out_dir`; return the path of report.md."""
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(results.model_dump_json(indent=1), encoding="utf-8")
    for name, draw in zip(PLOT_FILES, (_plot_rounds, _plot_bills, _plot_clusters), strict=True):
        draw(results, plots / name)
    report = out_dir / "report.md"
    report.write_text(render_markdown(results), encoding="utf-8")
    return report
