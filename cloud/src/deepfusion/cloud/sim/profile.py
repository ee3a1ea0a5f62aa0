"""What a simulated federation is made of: one TOML profile (`configs/demo.toml`, `quick.toml`, `real.toml`).

name = "demo"
rounds = 1
[data]       public windows, window length, test windows per domain
[packets]    k, top-p, J, P
[finetune]   each device's LoRA fine-tune on its private split
[student]    phase II: preset, steps, α, β, T, τ
[moe]        phase III: G, tune steps
[[devices]]  domain, preset, backend: a template, cycled to give `--devices N`
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from deepfusion.shared.config import Section, load_config
from deepfusion.shared.topics import validate_id

__all__ = ["DeviceTemplate", "SimProfile", "load_profile", "profile_path"]

Domain = Literal["medical", "finance"]
Backend = Literal["torch", "onnxruntime", "llama_cpp"]


def _known_preset(name: str) -> str:
    # Checked at load: the preset is first looked up when the assets are built, after the corpora.
    from deepfusion.cloud.zoo.presets import PRESETS

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return name


class DataSection(Section):
    public_windows: int = Field(384, ge=4, description="Public sequences handed out in each round.")
    public_mix: dict[str, float] = Field(
        {"general": 0.3, "medical": 0.5, "finance": 0.2},
        description="Share of the public windows taken from each public corpus; close to the corpora's own "
        "sizes, so the students keep the base's balance between domains.",
    )
    max_tokens: int = Field(128, ge=16, description="Tokens per public and test window.")
    test_windows: int = Field(64, ge=2, description="Held-out windows per domain (fixed before any run).")

    @field_validator("public_mix")
    @classmethod
    def _shares(cls, mix: dict[str, float]) -> dict[str, float]:
        # The shares are normalised by their sum: a negative one, or all zero, has no meaning.
        if any(not share >= 0 for share in mix.values()) or not sum(mix.values()) > 0:
            raise ValueError(f"public_mix shares must be >= 0 and not all 0, got {mix}")
        return mix


class PacketSection(Section):
    top_k: int = Field(16, ge=1, le=1024)
    top_p: float | None = Field(0.95, gt=0, le=1)
    stages: int = Field(2, ge=0, description="J")
    patches: int = Field(4, ge=1, description="P")


class FinetuneSection(Section):
    steps: int = Field(60, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-3, gt=0)
    lora_r: int = Field(16, ge=1)


class StudentSection(Section):
    preset: str = Field("student-tiny", description="Qwen2 model-zoo preset of the students and the MoE.")
    pretrain_steps: int = Field(300, ge=1, description="Base pretraining on public text (cached).")
    steps: int = Field(150, ge=1, description="Phase II steps per student.")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    alpha: float = Field(0.1, ge=0, description="VAA feature-loss weight.")
    beta: float = Field(1.0, ge=0, description="Top-k + tail KL weight.")
    temperature: float = Field(1.0, gt=0)
    tau: float | None = Field(0.2, gt=0, description="Teacher-quality temperature; unset: equal weights.")

    @field_validator("preset")
    @classmethod
    def _preset(cls, name: str) -> str:
        return _known_preset(name)


class MoeSection(Section):
    split: int = Field(1, ge=1, description="G: fine-grained experts per student FFN.")
    tune_steps: int = Field(100, ge=1, description="Phase III steps.")
    tune_lr: float = Field(5e-4, gt=0)
    tune_beta: float = Field(
        1.0,
        ge=0,
        description="KL weight of every device's packets while the MoE is tuned (0: next-token loss only).",
    )


class DeviceTemplate(Section):
    domain: Domain
    preset: str
    backend: Backend = "torch"

    @field_validator("preset")
    @classmethod
    def _preset(cls, name: str) -> str:
        return _known_preset(name)


class SimProfile(Section):
    name: str = Field(..., description="Profile name; the run's results go to results/<name>/.")
    federation: str = "demo"
    seed: int = 0
    rounds: int = Field(1, ge=1)
    clusters: int = Field(2, ge=1, description="K: knowledge domains = MoE experts per layer.")
    redundancy: int = Field(2, ge=1, description="R: devices of each cluster scoring each sequence.")
    round_s: float = Field(900.0, gt=0, description="Round deadline; a quorum closes it at the deadline.")
    quorum: float = Field(0.8, gt=0, le=1)
    devices_per_process: int = Field(4, ge=1, description="Edge agents hosted by one device process.")
    data: DataSection = Field(default_factory=DataSection)
    packets: PacketSection = Field(default_factory=PacketSection)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    student: StudentSection = Field(default_factory=StudentSection)
    moe: MoeSection = Field(default_factory=MoeSection)
    devices: list[DeviceTemplate] = Field(..., min_length=2)

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        # results/<name>/ is written and partly deleted: "", "." or ".." would put the run's files in
        # results/ itself or beside it, and a "/" somewhere else again.
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"name {name!r} must be one folder name (it becomes results/<name>/)")
        return name

    @field_validator("federation")
    @classmethod
    def _federation_id(cls, federation: str) -> str:
        # Checked at load: the services refuse a bad id only after the assets and devices are built. The
        # paper-mode arm runs as federation "<id>-paper", which must be a valid id too.
        validate_id(federation, "federation id")
        validate_id(f"{federation}-paper", "paper-mode federation id")
        return federation

    @model_validator(mode="after")
    def _both_domains(self) -> SimProfile:
        domains = {d.domain for d in self.devices}
        if domains != {"medical", "finance"}:
            raise ValueError(f"the device template needs medical and finance devices, has {sorted(domains)}")
        return self

    def fleet(self, count: int | None = None) -> list[tuple[str, DeviceTemplate, int]]:
        """(device id, template, index of its private share within its domain) for `count` devices."""
        count = count or len(self.devices)
        seen: dict[str, int] = {}
        fleet = []
        for i in range(count):
            template = self.devices[i % len(self.devices)]
            share = seen.get(template.domain, 0)
            seen[template.domain] = share + 1
            fleet.append((f"{template.domain[:3]}-{share:02d}", template, share))
        missing = {d.domain for d in self.devices} - set(seen)
        if missing:  # the comparison needs devices of every domain
            raise ValueError(
                f"{count} devices cycled from the profile's template leave out the {sorted(missing)} "
                "domain(s): ask for more devices, or order the template so that domains alternate"
            )
        return fleet


def profile_path(name_or_path: str) -> Path:
    """`demo` -> the packaged `configs/demo.toml`; anything with a suffix is a path."""
    path = Path(name_or_path)
    if path.suffix:
        return path
    root = Path(__file__).resolve().parents[5] / "configs"
    return root / f"{name_or_path}.toml"


def load_profile(name_or_path: str, overrides: list[str] | None = None) -> SimProfile:
    path = profile_path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no simulation profile {path}; the profiles are in configs/ (demo, quick, real)"
        )
    return load_config(SimProfile, path, overrides or [])
