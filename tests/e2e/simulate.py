"""`deepfusion-cloud simulate` run as a user runs it, for the end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def simulate(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`deepfusion-cloud simulate ARGS` in a wide terminal (so its tables are not folded), output kept."""
    return subprocess.run(
        [str(BIN / "deepfusion-cloud"), "simulate", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def tail(result: subprocess.CompletedProcess[str]) -> str:
    """The end of both output streams: what a failed run's assertion shows."""
    return result.stdout[-4000:] + result.stderr[-4000:]
