"""Results of one simulation run: every number the report, the plots and `metrics.json` show.

    results = RunResults(run="demo", profile="quick", ...)
    results.row("packets").scores["code"].nll

All models are pydantic v2, so `RunResults.model_validate_json(results.model_dump_json())` round-trips.
Byte counts are per device unless a field says otherwise; `nll` is in nats per predicted token.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from deepfusion.cloud.bills import RealSizeRow

__all__ = [
    "BillRow",
    "Check",
    "DeviceRow",
    "DomainScore",
    "MethodRow",
    "RealSizeRow",
    "RoundPoint",
    "RunResults",
    "ScalePoint",
]


class DomainScore(BaseModel):
    """A model's score on one domain's test set."""

    nll: float
    ppl: float
    acc: float
    tokens: int


class MethodRow(BaseModel):
    """One method of the main comparison table."""

    # Stable id: "base", "public-only", "device:<id>", "centralized", "logit-kd", "paper", "packets",
    # "packets-alpha0", "oracle", "weight-average".
    method: str
    label: str
    scores: dict[str, DomainScore]
    uplink_bytes_per_device: float | None = None
    downlink_bytes_per_device: float | None = None
    wall_s: float | None = None
    note: str = ""


class DeviceRow(BaseModel):
    """One simulated device: what it trained, what it sent, how its own model scores."""

    device: str
    domain: str
    preset: str
    architecture: str
    backend: str
    cluster: int | None
    share_docs: int
    finetune_val_before: float | None
    finetune_val_after: float | None
    packets: int
    uplink_bytes: int
    downlink_bytes: int
    dropped: bool = False
    scores: dict[str, DomainScore] = {}


class RoundPoint(BaseModel):
    """Scores of a method after round `round`; round -1 is the model before federation."""

    round: int
    method: str
    scores: dict[str, DomainScore]


class BillRow(BaseModel):
    """Communication bill of one method, per device, at the simulated size."""

    method: str
    uplink_bytes: float
    downlink_bytes: float
    rounds: int
    note: str = ""


class ScalePoint(BaseModel):
    """Cost of one run at a given number of devices."""

    devices: int
    uplink_bytes_per_device: float
    wall_s: float
    packets: int


class Check(BaseModel):
    """One acceptance check: its target, what was measured, and whether it passed."""

    name: str
    target: str
    measured: str
    passed: bool


class RunResults(BaseModel):
    """Everything one simulation run measured."""

    run: str
    profile: str
    started_at: datetime
    wall_s: float
    domains: list[str]
    config: dict[str, Any]
    rows: list[MethodRow]
    devices: list[DeviceRow]
    rounds: list[RoundPoint]
    bills: list[BillRow]
    real_sizes: list[RealSizeRow]
    scale: list[ScalePoint] = []
    clusters: dict[str, int]  # device -> cluster
    cluster_silhouette: float | None = None
    checks: list[Check] = []
    dropped_devices: list[str] = []
    hostile_device: str | None = None  # the device that published poisoned packets, if any
    quarantined: dict[str, str] = {}  # device -> why the trainer's screening left it out
    release: str | None = None  # release directory or URI

    def row(self, method: str) -> MethodRow:
        """The row of `method`; KeyError naming it (and the methods present) if the run has none."""
        for row in self.rows:
            if row.method == method:
                return row
        present = ", ".join(r.method for r in self.rows) or "none"
        raise KeyError(f"run {self.run!r} has no row for method {method!r} (methods: {present})")

    def has_row(self, method: str) -> bool:
        """Whether the run has a row for `method`."""
        return any(r.method == method for r in self.rows)
