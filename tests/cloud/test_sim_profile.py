"""The simulation profiles: what the shipped configs promise, and how a fleet is drawn from a template."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from deepfusion.cloud.sim.profile import SimProfile, load_profile
from deepfusion.cloud.students import warmup_cosine
from deepfusion.cloud.zoo.presets import get_preset
from deepfusion.shared.config import ConfigError


def _architectures(profile: SimProfile, count: int | None = None) -> set[str]:
    return {get_preset(t.preset).config(4096).model_type for _, t, _ in profile.fleet(count)}


def test_the_demo_is_a_mixed_fleet_of_at_least_eight_devices() -> None:
    demo = load_profile("demo")
    fleet = demo.fleet()
    assert len(fleet) >= 8
    assert len(_architectures(demo)) >= 3
    assert len({t.backend for _, t, _ in fleet}) >= 2
    assert {t.domain for _, t, _ in fleet} == {"medical", "finance"}


@pytest.mark.parametrize("name", ["quick", "real"])
def test_every_shipped_profile_loads(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name and profile.rounds >= 1
    assert len({t.backend for _, t, _ in profile.fleet()}) >= 2


def test_the_real_profile_runs_smollm2_devices() -> None:
    assert {t.preset for t in load_profile("real").devices} == {"smollm2-135m"}


def test_fleet_cycles_the_template_and_numbers_shares_per_domain() -> None:
    fleet = load_profile("demo").fleet(64)
    ids = [device for device, _, _ in fleet]
    assert len(set(ids)) == 64
    for domain in ("medical", "finance"):
        shares = [share for _, t, share in fleet if t.domain == domain]
        assert shares == list(range(32))  # every device of a domain owns its own private share


def test_a_one_domain_template_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        'name = "bad"\n[[devices]]\ndomain = "medical"\npreset = "tiny-llama"\n'
        '[[devices]]\ndomain = "medical"\npreset = "tiny-gpt2"\n'
    )
    with pytest.raises(ConfigError, match="finance"):
        load_profile(str(path))


def test_a_fleet_too_small_for_every_domain_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "grouped.toml"
    path.write_text(
        'name = "grouped"\n[[devices]]\ndomain = "medical"\npreset = "tiny-llama"\n'
        '[[devices]]\ndomain = "medical"\npreset = "tiny-gpt2"\n'
        '[[devices]]\ndomain = "finance"\npreset = "tiny-gpt2"\n'
    )
    profile = load_profile(str(path))
    assert {t.domain for _, t, _ in profile.fleet(3)} == {"medical", "finance"}
    with pytest.raises(ValueError, match="finance"):
        profile.fleet(2)  # two medical devices: no finance row could be measured


def test_unknown_profile_and_unknown_key_are_clear_errors() -> None:
    with pytest.raises(FileNotFoundError, match="configs/"):
        load_profile("nonesuch")
    with pytest.raises(ConfigError, match="stepz"):
        load_profile("quick", ["student.stepz=3"])


def test_warmup_then_cosine_to_a_tenth() -> None:
    factors = [warmup_cosine(s, warmup=10, total=110) for s in range(120)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[9:]))  # never rises after warmup
    assert factors[60] == pytest.approx(0.55) and factors[110] == pytest.approx(0.1) == factors[119]


@pytest.mark.parametrize(
    "mix", ["data.public_mix.finance=-0.2", "data.public_mix={general=0,medical=0,finance=0}"]
)
def test_public_mix_shares_are_non_negative_and_not_all_zero(mix: str) -> None:
    # The mix is normalised by its sum: -0.2 turned 2048 windows into 1024 general + 1707 medical and a
    # negative finance count (a slice from the end), and all zeros divided by zero when the assets were built.
    with pytest.raises(ConfigError, match="public_mix"):
        load_profile("demo", [mix])


def test_an_unknown_preset_is_a_config_error(tmp_path: Path) -> None:
    # It was only looked up when the assets were built, after the corpora: a KeyError traceback.
    with pytest.raises(ConfigError, match=r"student\.preset.*unknown preset 'student-tnyi'"):
        load_profile("quick", ["student.preset=student-tnyi"])
    path = tmp_path / "typo.toml"
    path.write_text(
        'name = "typo"\n[[devices]]\ndomain = "medical"\npreset = "tiny-lama"\n'
        '[[devices]]\ndomain = "finance"\npreset = "tiny-gpt2"\n'
    )
    with pytest.raises(ConfigError, match=r"devices\.0\.preset.*unknown preset 'tiny-lama'"):
        load_profile(str(path))


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "..\\x"])
def test_the_run_name_is_one_folder_name(name: str) -> None:
    # `--set name=` wrote store, work, logs and report.md straight into results/ (and ".." beside it).
    with pytest.raises(ConfigError, match="must be one folder name"):
        load_profile("quick", [f"name={json.dumps(name)}"])


@pytest.mark.parametrize("federation", ["Demo", "a/b", "x" * 60])
def test_a_bad_federation_id_is_a_config_error(federation: str) -> None:
    # The services refused it only after the assets and devices were built; 60 characters fit an id, but
    # not the paper-mode arm's "<id>-paper".
    with pytest.raises(ConfigError, match="federation id"):
        load_profile("quick", [f'federation="{federation}"'])
