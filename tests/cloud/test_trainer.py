"""A tiny real round end to end: two tiny device models score public text through the edge scorer, the
packets land in a local store, and the trainer distills, merges, tunes and writes a loadable release."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from deepfusion.cloud.cli import app  # noqa: E402
from deepfusion.cloud.cluster import ClusterReport  # noqa: E402
from deepfusion.cloud.coordinator import release_key  # noqa: E402
from deepfusion.cloud.data import cluster_batches, index_round, read_clusters  # noqa: E402
from deepfusion.cloud.evaluate import evaluate_windows, token_windows  # noqa: E402
from deepfusion.cloud.merge import MergeSpec  # noqa: E402
from deepfusion.cloud.sim.arms import weight_average, window_batches  # noqa: E402
from deepfusion.cloud.students import StudentSpec  # noqa: E402
from deepfusion.cloud.trainer import (  # noqa: E402
    TrainSpec,
    evaluate_domains,
    merge_and_tune,
    train_round,
    train_students,
)
from deepfusion.cloud.vaa import VAAConfig  # noqa: E402
from deepfusion.cloud.zoo.tokenizer import END_OF_TEXT, train_byte_level_bpe  # noqa: E402
from deepfusion.shared.corpora import FileEntry, SplitManifest, read_jsonl  # noqa: E402
from deepfusion.shared.messages import ReleaseNote  # noqa: E402
from deepfusion.shared.store import ObjectStore, open_store  # noqa: E402
from tests.cloud.tiny import DEVICES, FED, ROUND, put_sequences, tiny_student  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def test_batches_join_devices_of_a_cluster_with_quality_weights(round_store: str) -> None:
    store = open_store(round_store)
    both = ClusterReport(
        k=1,
        assignment={d: 0 for d in DEVICES},
        members={0: sorted(DEVICES)},
        sizes={0: 2},
        silhouette=None,
        centroids=[[1.0]],
    )
    index = index_round(store, FED, ROUND, both)
    assert index.stages == 2 and index.patches == 2 and index.feature_widths == {128, 192}
    batches = list(cluster_batches(store, index, 0, batch_size=5, seed=1))
    assert sum(b.input_ids.size(0) for b in batches) == len(index.cluster_keys(0))
    batch = batches[0]
    assert len(batch.rows) == 2 * batch.input_ids.size(0)  # both devices scored every sequence
    for seq in range(batch.input_ids.size(0)):
        rows = [r for r in batch.rows if r.seq == seq]
        assert sum(r.weight for r in rows) == pytest.approx(1.0)
        assert all(r.topk_ids.size(0) == int(batch.lengths[seq]) for r in rows)
        assert all(r.features is not None and r.features.shape[-1] == r.width for r in rows)
    # The device with the lower mean seq_nll gets the larger weight.
    nll = {
        d: np.mean([v for k in index.sequences for _, dev, v in index.sequences[k] if dev == d])
        for d in DEVICES
    }
    better = min(nll, key=nll.get)
    assert next(r.weight for r in batch.rows if r.device == better) > 0.5


def test_the_packet_cache_reads_a_packet_once_and_keeps_within_its_bytes(tmp_path: Path) -> None:
    from deepfusion.cloud.data import PacketCache
    from deepfusion.shared.packets import SequenceKnowledge
    from deepfusion.shared.store.local import LocalStore

    class CountingStore(LocalStore):
        def __init__(self, root: Path) -> None:
            super().__init__(root)
            self.reads: list[str] = []

        def get(self, key: str) -> bytes:
            self.reads.append(key)
            return super().get(key)

    store = CountingStore(tmp_path / "store")
    rng = np.random.default_rng(0)
    for device in ("a", "b", "c"):
        top = np.stack([rng.permutation(50)[:4] for _ in range(6)])
        put_sequences(
            store,
            device,
            [SequenceKnowledge(0, np.arange(6), np.zeros((6, 2)), top, np.full((6, 4), -1.7), 2.0)],
            50,
        )
    a, b, c = (next(iter(store.list(f"{FED}/rounds/{ROUND}/knowledge/{d}/"))) for d in "abc")

    roomy = PacketCache(store)
    for key in (a, b, c, a, b, c):
        header, sequences = roomy.get(key)
        assert header.device == key.split("/")[-2] and set(sequences) == {0}
    assert store.reads == [a, b, c]

    store.reads.clear()
    size = roomy.sizes[a]
    assert size > 0 and roomy.bytes == 3 * size
    tight = PacketCache(store, max_bytes=2 * size)
    for key in (a, b, c, b, a):
        tight.get(key)
    # c pushed out a, the least recently used; b stayed; a is read again and pushes out c.
    assert store.reads == [a, b, c, a]
    assert list(tight.items) == [b, a] and tight.bytes == 2 * size


def test_a_sequence_sent_twice_by_one_device_is_one_loss_term(tmp_path: Path) -> None:
    """Device a scores sequence 0 in two packets: it must not get twice b's weight on it."""

    from deepfusion.shared.packets import SequenceKnowledge

    vocab, n = 50, 6
    rng = np.random.default_rng(0)

    def knowledge(sequence_id: int) -> SequenceKnowledge:
        top = np.stack([rng.permutation(vocab)[:4] for _ in range(n)])
        return SequenceKnowledge(sequence_id, np.arange(n), np.zeros((n, 2)), top, np.full((n, 4), -1.7), 2.0)

    store = open_store(str(tmp_path / "store"))
    for device, ids in (("a", [0, 1]), ("b", [0, 1]), ("a", [0])):
        put_sequences(store, device, [knowledge(i) for i in ids], vocab)
    clusters = ClusterReport(
        k=1,
        assignment={"a": 0, "b": 0},
        members={0: ["a", "b"]},
        sizes={0: 2},
        silhouette=None,
        centroids=[[1.0]],
    )
    (batch,) = cluster_batches(store, index_round(store, FED, ROUND, clusters), 0, batch_size=8)
    for seq in range(batch.input_ids.size(0)):
        rows = sorted((r.device, r.weight) for r in batch.rows if r.seq == seq)
        assert rows == [("a", pytest.approx(0.5)), ("b", pytest.approx(0.5))], (seq, rows)


def test_a_device_skipped_for_its_tokens_leaves_its_weight_to_the_others(tmp_path: Path) -> None:
    """c tokenized sequence 0 differently: its row is dropped, and a and b still weigh 1 together."""

    from deepfusion.shared.packets import SequenceKnowledge

    vocab, n = 50, 6
    rng = np.random.default_rng(0)

    def knowledge(token_ids: np.ndarray) -> SequenceKnowledge:
        top = np.stack([rng.permutation(vocab)[:4] for _ in range(n)])
        return SequenceKnowledge(0, token_ids, np.zeros((n, 2)), top, np.full((n, 4), -1.7), 2.0)

    store = open_store(str(tmp_path / "store"))
    for device, token_ids in (("a", np.arange(n)), ("b", np.arange(n)), ("c", np.arange(n)[::-1].copy())):
        put_sequences(store, device, [knowledge(token_ids)], vocab)
    clusters = ClusterReport(
        k=1,
        assignment={"a": 0, "b": 0, "c": 0},
        members={0: ["a", "b", "c"]},
        sizes={0: 3},
        silhouette=None,
        centroids=[[1.0]],
    )
    (batch,) = cluster_batches(store, index_round(store, FED, ROUND, clusters), 0, tau=None)
    rows = sorted((r.device, r.weight) for r in batch.rows)
    assert rows == [("a", pytest.approx(0.5)), ("b", pytest.approx(0.5))]


def test_phase_three_kl_shares_of_unequal_ranks_average_to_the_single_process_kl() -> None:
    """3 sequences over 2 ranks (2 + 1): FSDP averages the ranks' gradients, so the mean of the ranks'
    KL terms must be the global batch's KL, as the CE's is."""
    from deepfusion.cloud.data import Batch, TeacherRow
    from deepfusion.cloud.distributed import Ranks
    from deepfusion.cloud.losses import tempered_log_probs
    from deepfusion.cloud.students import batch_kl
    from deepfusion.cloud.trainer import _share_kl

    torch.manual_seed(0)
    vocab, size, length = 20, 3, 5
    logits = torch.randn(size, length, vocab)
    rows = [
        TeacherRow(
            s,
            "d",
            1.0,
            torch.stack([torch.randperm(vocab)[:4] for _ in range(length)]),
            torch.log_softmax(torch.randn(length, vocab), -1)[:, :4],
            None,
            (),
            0,
        )
        for s in range(size)
    ]
    ids = torch.randint(0, vocab, (size, length))
    batch = Batch(ids, torch.ones_like(ids), torch.full((size,), length), rows)
    spec = TrainSpec(student=StudentSpec(temperature=2.0))
    log_probs = tempered_log_probs(logits, 2.0)
    shares = [_share_kl(log_probs[rank::2], Ranks(rank, 2).slice(batch), batch, 2, spec) for rank in range(2)]
    assert float(sum(shares) / 2) == pytest.approx(float(batch_kl(log_probs, batch, 2.0)), rel=1e-6)
    assert float(_share_kl(log_probs, batch, batch, 1, spec)) == float(batch_kl(log_probs, batch, 2.0))


def test_zero_phase_two_steps_keep_the_initial_student() -> None:
    base = tiny_student(64)
    windows = [np.arange(10) for _ in range(4)]
    students, reports = train_students(
        {0: lambda e: window_batches(windows, 2, seed=e)}, {0: base}, StudentSpec(steps=0)
    )
    assert reports[0]["history"] == []
    for key, value in students[0].state_dict().items():
        assert torch.equal(value, base.state_dict()[key]), key


def test_a_tiny_round_trains_and_releases_a_loadable_moe(
    round_store: str, tokenizer_dir: Path, texts: dict[str, list[str]], tmp_path: Path
) -> None:
    store = open_store(round_store)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    heldout = {"medical": token_windows(tokenizer, texts["heldout"], max_tokens=96)}
    spec = TrainSpec(
        student=StudentSpec(steps=20, batch_size=4, lr=3e-3, alpha=0.1, vaa=VAAConfig(width=32)),
        merge=MergeSpec(split=2),
        tune_steps=4,
        tune_batch_size=4,
    )
    base = tiny_student(len(tokenizer))
    note, report = train_round(store, FED, ROUND, base, tokenizer, spec, heldout=heldout)

    for cluster, student in report["students"].items():
        assert student["after"]["medical"]["nll"] < student["before"]["medical"]["nll"] - 0.3, (
            cluster,
            student,
        )
        assert all(np.isfinite(list(step.values())).all() for step in student["history"])
        assert student["history"][-1]["fm"] > 0 and student["history"][-1]["kl"] > 0
        # The feature term's gradient reaches the student backbone, and is measured (step 1, 26, ...).
        assert student["fm_ce_grad"] and all(r > 0 for r in student["fm_ce_grad"])
    assert np.isfinite(report["tune"]).all()

    written = ReleaseNote.model_validate_json(store.get(release_key(FED, "r0")))
    assert written.version == note.version == "r0" and written.architecture == "Qwen2MoeForCausalLM"
    assert {"medical.nll", "medical.acc"} <= set(written.metrics)
    assert store.get(f"{FED}/rounds/{ROUND}/students/0/config.json")

    release = Path(round_store) / FED / "releases" / "r0" / "model"
    moe = AutoModelForCausalLM.from_pretrained(release)
    assert moe.config.num_experts == 4
    assert evaluate_windows(moe, heldout["medical"])["nll"] == pytest.approx(
        written.metrics["medical.nll"], abs=1e-4
    )
    assert json.loads((release / "metrics.json").read_text())["heldout"]["medical"]["nll"] == pytest.approx(
        written.metrics["medical.nll"]
    )
    loaded_tokenizer = AutoTokenizer.from_pretrained(release)
    prompt = loaded_tokenizer("The patients", return_tensors="pt")
    out = moe.generate(
        **prompt, max_new_tokens=6, do_sample=False, pad_token_id=loaded_tokenizer.pad_token_id
    )
    assert out.shape[1] == prompt["input_ids"].shape[1] + 6


def test_a_cluster_without_packets_keeps_its_starting_expert_and_the_round_is_released(
    round_store: str, tokenizer_dir: Path, tmp_path: Path
) -> None:
    """A round closed with a quorum may leave a whole cluster silent: the others still train, and the
    release is written."""
    root = tmp_path / "store"
    shutil.copytree(round_store, root)
    shutil.rmtree(root / FED / "rounds" / str(ROUND) / "knowledge" / "dev-gpt2")  # cluster 1 sent nothing
    store = open_store(str(root))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = TrainSpec(student=StudentSpec(steps=3, batch_size=4, vaa=VAAConfig(width=32)), tune_steps=2)
    base = tiny_student(len(tokenizer))
    note, report = train_round(store, FED, ROUND, base, tokenizer, spec)

    assert report["untrained"] == [1]
    assert len(report["students"][0]["history"]) == 3 and report["students"][1]["history"] == []
    assert store.exists(release_key(FED, note.version))
    kept = AutoModelForCausalLM.from_pretrained(root / FED / "rounds" / str(ROUND) / "students" / "1")
    for name, value in kept.state_dict().items():
        assert torch.equal(value, base.state_dict()[name]), name


def test_a_base_the_merge_would_refuse_is_refused_before_phase_two(
    round_store: str, tokenizer_dir: Path, tmp_path: Path
) -> None:
    """Sliding windows in some layers only (max_window_layers) cannot be merged into Qwen2-MoE: the
    round fails before any student is trained, not after phase II."""
    root = tmp_path / "store"
    shutil.copytree(round_store, root)
    shutil.rmtree(root / FED / "rounds" / str(ROUND) / "students", ignore_errors=True)  # earlier tests'
    store = open_store(str(root))
    base = tiny_student(len(AutoTokenizer.from_pretrained(tokenizer_dir)))
    base.config.use_sliding_window, base.config.sliding_window = True, 8
    base.config.layer_types = ["full_attention", "sliding_attention"]
    spec = TrainSpec(student=StudentSpec(steps=2, batch_size=4), tune_steps=1)
    with pytest.raises(ValueError, match="sliding"):
        train_round(store, FED, ROUND, base, AutoTokenizer.from_pretrained(tokenizer_dir), spec)
    assert not list(store.list(f"{FED}/rounds/{ROUND}/students/"))


def test_a_tokenizer_or_base_that_does_not_fit_the_round_is_refused_before_phase_two(
    round_store: str, tokenizer_dir: Path, tmp_path: Path
) -> None:
    """The packets hold token ids of the round's tokenizer. Another tokenizer trained the students on
    ids that meant other tokens, silently; a base with fewer embeddings than its tokenizer's tokens
    stopped phase II with an IndexError."""
    root = tmp_path / "store"
    shutil.copytree(round_store, root)
    shutil.rmtree(root / FED / "rounds" / str(ROUND) / "students", ignore_errors=True)  # earlier tests'
    store = open_store(str(root))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = TrainSpec(student=StudentSpec(steps=2, batch_size=4), tune_steps=1)
    with pytest.raises(ValueError, match="fewer than its tokenizer's"):
        train_round(store, FED, ROUND, tiny_student(len(tokenizer) - 1), tokenizer, spec)
    other = {"spec": {"tokenizer": "f" * 64}}  # a round whose devices used another tokenizer
    store.put(f"{FED}/rounds/{ROUND}/state.json", json.dumps(other).encode())
    with pytest.raises(ValueError, match="is not round 0's"):
        train_round(store, FED, ROUND, tiny_student(len(tokenizer)), tokenizer, spec)
    assert not list(store.list(f"{FED}/rounds/{ROUND}/students/"))


def test_train_command_writes_the_release_and_streams_metrics(
    round_store: str, tokenizer_dir: Path, texts: dict[str, list[str]], tmp_path: Path, broker, mqtt_client
) -> None:
    from deepfusion.shared.messages import Metrics
    from deepfusion.shared.topics import metrics_topic
    from tests.fixtures.broker import Inbox

    base = tmp_path / "base"
    tiny_student(len(AutoTokenizer.from_pretrained(tokenizer_dir))).save_pretrained(base)
    test_file = tmp_path / "medical-test.jsonl"
    test_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts["heldout"]))
    inbox = Inbox()
    mqtt_client(broker.config(), "watcher").subscribe(metrics_topic(FED), inbox)
    args = ["train", "--round", "0", "--base", str(base), "--tokenizer", str(tokenizer_dir)]
    args += ["--set", f'federation="{FED}"', "--set", f'store.uri="{round_store}"']
    args += ["--set", f"mqtt.port={broker.port}", "--set", f'mqtt.host="{broker.host}"']
    args += ["--steps", "10", "--tune-steps", "10", "--tau", "0", "--version", "cli-1"]
    args += ["--eval", f"medical={test_file}", "--no-warm-start"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    note = json.loads(open_store(round_store).get(release_key(FED, "cli-1")))
    assert note["round"] == 0 and note["uri"].endswith("/releases/cli-1/model")
    assert note["metrics"]["medical.nll"] > 0
    assert read_clusters(open_store(round_store), FED, 0).k == 2
    metrics = [
        Metrics.model_validate_json(m.payload)
        for m in inbox.wait_until(
            lambda ms: any(b'"release"' in m.payload for m in ms), what="the release metrics"
        )
    ]
    phases = {m.phase for m in metrics}
    assert {"phase II cluster 0", "phase II cluster 1", "phase III", "release"} <= phases
    assert all(m.federation == FED and m.round == 0 for m in metrics)
    release = next(m for m in metrics if m.phase == "release")
    assert release.values["medical.nll"] == pytest.approx(note["metrics"]["medical.nll"])


def test_train_command_refuses_a_malformed_eval_set(round_store: str, tmp_path: Path) -> None:
    args = ["train", "--round", "0", "--base", str(tmp_path), "--eval", "medical"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "DOMAIN=FILE" in result.output


def _cli_args(store: str, base: Path, tokenizer_dir: Path, version: str) -> list[str]:
    args = ["train", "--round", "0", "--base", str(base), "--tokenizer", str(tokenizer_dir), "--no-publish"]
    args += ["--set", f'federation="{FED}"', "--set", f'store.uri="{store}"']
    return [*args, "--steps", "2", "--tune-steps", "4", "--version", version, "--no-warm-start"]


def test_train_command_refuses_a_missing_or_foreign_base_with_a_message(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = ["--no-publish", "--set", f'federation="{FED}"', "--set", f'store.uri="{tmp_path / "store"}"']
    missing = CliRunner().invoke(
        app, ["train", "--round", "0", "--base", str(tmp_path / "nothing"), *settings]
    )
    assert missing.exit_code == 2 and "does not exist" in missing.output
    empty = CliRunner().invoke(app, ["train", "--round", "0", "--base", str(tmp_path), *settings])
    assert empty.exit_code == 2 and "--base" in empty.output
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    llama = CliRunner().invoke(app, ["train", "--round", "0", "--base", str(tmp_path / "llama"), *settings])
    assert llama.exit_code == 2 and "LlamaForCausalLM" in llama.output and "Qwen2" in llama.output


def test_train_command_reports_a_bad_config_or_store_without_a_traceback(tmp_path: Path) -> None:
    cases = {
        "does not exist": ["--config", str(tmp_path / "missing.toml")],
        "expected KEY=VALUE": ["--set", "federation"],
        "unsupported scheme": ["--set", 'store.uri="ftp://host/path"'],
    }
    for message, extra in cases.items():
        result = CliRunner().invoke(
            app, ["train", "--round", "0", "--base", str(tmp_path), "--no-publish", *extra]
        )
        assert result.exit_code == 2 and message in result.output, (extra, result.exception, result.output)


def test_train_command_refuses_a_folder_without_a_tokenizer_with_a_message(tmp_path: Path) -> None:
    """A student checkpoint without tokenizer files, and an empty --tokenizer folder: a message, not
    transformers' TypeError or AttributeError."""
    base = tmp_path / "base"
    tiny_student(64).save_pretrained(base)
    (tmp_path / "empty").mkdir()
    settings = ["--no-publish", "--set", f'federation="{FED}"', "--set", f'store.uri="{tmp_path / "store"}"']
    for option, extra in (("--base", []), ("--tokenizer", ["--tokenizer", str(tmp_path / "empty")])):
        result = CliRunner().invoke(app, ["train", "--round", "0", "--base", str(base), *extra, *settings])
        assert result.exit_code == 2 and option in result.output, (extra, result.exception, result.output)
        assert "nothing AutoTokenizer can load" in " ".join(result.output.replace("│", " ").split())


def test_train_command_refuses_a_split_before_training(tokenizer_dir: Path, tmp_path: Path) -> None:
    """G = 0 (a ZeroDivisionError in the merge) or one that does not divide the FFN width is refused at
    once, not after phase II: here the round is missing, which phase II would have reported first."""
    base = tmp_path / "base"
    tiny_student(len(AutoTokenizer.from_pretrained(tokenizer_dir))).save_pretrained(base)
    args = _cli_args(str(tmp_path / "store"), base, tokenizer_dir, "none")
    for split in ("0", "3"):
        result = CliRunner().invoke(app, [*args, "--split", split])
        assert result.exit_code == 2 and "--split" in result.output, (split, result.exception, result.output)
    assert not (tmp_path / "store").exists() or not list(open_store(str(tmp_path / "store")).list(FED))


def test_train_command_refuses_an_eval_set_without_windows_and_a_missing_round(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    """No held-out windows would report a perfect perplexity of 1; a round not in the store, a traceback."""
    base = tmp_path / "base"
    tiny_student(len(AutoTokenizer.from_pretrained(tokenizer_dir))).save_pretrained(base)
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    (tmp_path / "short.txt").write_text("a\n")
    (tmp_path / "good.txt").write_text("The patients were seen in the clinic.\n")
    args = _cli_args(str(tmp_path / "store"), base, tokenizer_dir, "none")
    for name, message in (("bad.jsonl", "unreadable"), ("short.txt", "no text")):
        result = CliRunner().invoke(app, [*args, "--eval", f"medical={tmp_path / name}"])
        assert result.exit_code == 2 and message in result.output, result.output
    missing = CliRunner().invoke(app, [*args, "--eval", f"medical={tmp_path / 'good.txt'}"])
    assert missing.exit_code == 1 and "round 0 of 'fed' is not in the store" in missing.output


def test_train_command_refuses_a_bias_update_without_deepseek(round_store: str, tmp_path: Path) -> None:
    args = ["train", "--round", "0", "--base", str(tmp_path), "--bias-update", "0.01"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "deepseek_v3" in result.output


def test_train_command_refuses_a_temperature_of_zero(tokenizer_dir: Path, tmp_path: Path) -> None:
    """T = 0 divides the logits by 0: every weight of the release would be NaN, written all the same."""
    base = tmp_path / "base"
    tiny_student(len(AutoTokenizer.from_pretrained(tokenizer_dir))).save_pretrained(base)
    args = _cli_args(str(tmp_path / "store"), base, tokenizer_dir, "none")
    for temperature in ("0", "-1"):
        result = CliRunner().invoke(app, [*args, "--temperature", temperature])
        assert result.exit_code == 2 and "--temperature" in result.output, (temperature, result.output)


def test_train_command_refuses_a_batch_or_window_too_small_to_use(tmp_path: Path) -> None:
    """Refused as the option's fault, not as an unreadable --eval file or a range() error mid-run."""
    (tmp_path / "good.txt").write_text("The patients were seen in the clinic.\n")
    args = ["train", "--round", "0", "--base", str(tmp_path), "--eval", f"medical={tmp_path / 'good.txt'}"]
    for option, value in (("--batch-size", "0"), ("--eval-tokens", "0"), ("--eval-tokens", "1")):
        result = CliRunner().invoke(app, [*args, option, value])
        assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, result.output


def test_train_command_refuses_a_release_version_it_could_not_publish(tmp_path: Path) -> None:
    """Before any training: '..' used to fail in the store after phase II (a traceback), and 'a/b'
    wrote a release one folder too deep for the coordinator to find."""
    args = ["train", "--round", "0", "--base", str(tmp_path), "--no-publish"]
    for version in ("..", "a/b", "a\\b"):
        result = CliRunner().invoke(app, [*args, "--version", version])
        assert result.exit_code == 2 and "Invalid value for --version" in result.output, result.output


def test_train_command_applies_the_bias_update_to_a_deepseek_release(
    round_store: str, tokenizer_dir: Path, tmp_path: Path
) -> None:
    base = tmp_path / "base"
    tiny_student(len(AutoTokenizer.from_pretrained(tokenizer_dir))).save_pretrained(base)
    args = _cli_args(round_store, base, tokenizer_dir, "cli-ds")
    # An odd step count: on a fresh router the ±rate update can flip the load every step, so after an
    # even number of steps the bias may be back at 0.
    args += ["--architecture", "deepseek_v3", "--bias-update", "0.05", "--tune-steps", "5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    moe = AutoModelForCausalLM.from_pretrained(Path(round_store) / FED / "releases" / "cli-ds" / "model")
    assert type(moe).__name__ == "DeepseekV3ForCausalLM"
    biases = [m.e_score_correction_bias for m in moe.modules() if hasattr(m, "e_score_correction_bias")]
    assert biases and all(b.abs().max() > 0 for b in biases)  # 0 right after the merge


def test_train_command_takes_a_bf16_sharded_base_whose_generation_config_transformers_will_not_save(
    round_store: str, tokenizer_dir: Path, tmp_path: Path
) -> None:
    """A real base (bf16, sharded, tied) may ship sampling flags without do_sample, as many hub
    checkpoints do: transformers loads them (generate ignores them) but refuses to save them, which
    failed the run when the first student was put in the store, after phase II."""
    store_dir = tmp_path / "store"
    shutil.copytree(round_store, store_dir)
    base = tmp_path / "base"
    tiny_student(len(AutoTokenizer.from_pretrained(tokenizer_dir))).to(torch.bfloat16).save_pretrained(
        base, max_shard_size="100KB"
    )
    assert (base / "model.safetensors.index.json").exists()
    (base / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_p": 0.8}))
    result = CliRunner().invoke(app, _cli_args(str(store_dir), base, tokenizer_dir, "cli-gen"))
    assert result.exit_code == 0, result.output
    student = AutoModelForCausalLM.from_pretrained(store_dir / FED / "rounds" / str(ROUND) / "students" / "0")
    assert not student.generation_config.do_sample  # greedy, as the base decodes
    release = AutoModelForCausalLM.from_pretrained(store_dir / FED / "releases" / "cli-gen" / "model")
    assert release.config.tie_word_embeddings and not release.generation_config.do_sample


def test_train_command_refuses_an_unreadable_checkpoint_unless_told_to_start_over(
    round_store: str, tokenizer_dir: Path, tmp_path: Path
) -> None:
    store_dir = tmp_path / "store"
    shutil.copytree(round_store, store_dir)
    open_store(str(store_dir)).put(f"{FED}/rounds/{ROUND}/checkpoints/cluster-0.pt", b"not a checkpoint")
    base = tmp_path / "base"
    tiny_student(len(AutoTokenizer.from_pretrained(tokenizer_dir))).save_pretrained(base)
    args = _cli_args(str(store_dir), base, tokenizer_dir, "cli-resume")

    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 1 and "cluster-0.pt is unreadable" in refused.output
    assert "--no-resume" in refused.output
    started_over = CliRunner().invoke(app, [*args, "--no-resume"])
    assert started_over.exit_code == 0, started_over.output
    assert open_store(str(store_dir)).exists(release_key(FED, "cli-resume"))
    assert not list(open_store(str(store_dir)).list(f"{FED}/rounds/{ROUND}/checkpoints/"))


def test_next_round_starts_from_the_stored_students(tmp_path: Path) -> None:
    from deepfusion.cloud.trainer import previous_students, students_prefix

    store = open_store(str(tmp_path / "store"))
    student = tiny_student(384)
    student.save_pretrained(tmp_path / "student")
    for path in (tmp_path / "student").iterdir():
        store.put(f"{students_prefix(FED, 2, 1)}{path.name}", path.read_bytes())
    assert previous_students(store, FED, 0, [0, 1]) == {}
    found = previous_students(store, FED, 3, [0, 1])
    assert sorted(found) == [1]  # cluster 0 had no student in round 2
    for (name, a), (_, b) in zip(found[1].state_dict().items(), student.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


class _Killed(Exception):
    """Stands in for the process dying."""


def test_a_killed_training_resumes_to_the_same_release(
    round_store: str, tokenizer_dir: Path, texts: dict[str, list[str]], tmp_path: Path
) -> None:
    from deepfusion.cloud.checkpoints import Checkpoints
    from deepfusion.shared.messages import Metrics

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    heldout = {"medical": token_windows(tokenizer, texts["heldout"], max_tokens=96)}
    spec = TrainSpec(
        student=StudentSpec(steps=12, batch_size=4, lr=3e-3, alpha=0.1, vaa=VAAConfig(width=32)),
        tune_steps=3,
        tune_batch_size=4,
        checkpoint_every=4,
        metrics_every=1,
    )
    stores = {}
    for name in ("whole", "resumed"):
        shutil.copytree(round_store, tmp_path / name)
        stores[name] = open_store(str(tmp_path / name))
    base = tiny_student(len(tokenizer))
    whole, _ = train_round(stores["whole"], FED, ROUND, base, tokenizer, spec, heldout=heldout)

    def die_in_cluster_1(metric: Metrics) -> None:
        if metric.phase == "phase II cluster 1" and metric.step == 7:
            raise _Killed

    with pytest.raises(_Killed):
        train_round(
            stores["resumed"], FED, ROUND, tiny_student(len(tokenizer)), tokenizer, spec,
            heldout=heldout, sink=die_in_cluster_1,
        )  # fmt: skip
    stored = Checkpoints(stores["resumed"], FED, ROUND, fingerprint="any")
    left = {key.rsplit("/", 1)[1] for key in stores["resumed"].list(stored.prefix)}
    assert left == {"cluster-0.pt", "cluster-1.pt"}

    seen: list[Metrics] = []
    resumed, _ = train_round(
        stores["resumed"], FED, ROUND, tiny_student(len(tokenizer)), tokenizer, spec,
        heldout=heldout, sink=seen.append,
    )  # fmt: skip
    phase_two = [(m.phase, m.step) for m in seen if m.phase.startswith("phase II")]
    assert phase_two[0] == ("phase II cluster 1", 5)  # cluster 0 was done; cluster 1 goes on after step 4
    assert not list(stores["resumed"].list(stored.prefix))  # checkpoints removed with the release written
    assert resumed.metrics["medical.nll"] == pytest.approx(whole.metrics["medical.nll"], abs=1e-6)
    models = {
        name: AutoModelForCausalLM.from_pretrained(tmp_path / name / FED / "releases" / "r0" / "model")
        for name in stores
    }
    reference = models["whole"].state_dict()
    for key, value in models["resumed"].state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-6, msg=key)


def test_a_rerun_from_another_base_does_not_resume_the_old_checkpoints(tmp_path: Path) -> None:
    """Killed after a checkpoint, then run again with a different base of the same shape: phase II
    starts over from the new base instead of silently continuing the old base's student."""

    from deepfusion.shared.messages import Metrics
    from deepfusion.shared.packets import SequenceKnowledge

    vocab, n = 64, 8
    rng = np.random.default_rng(0)
    store = open_store(str(tmp_path / "store"))
    sequences = [
        SequenceKnowledge(
            i,
            rng.integers(0, vocab, n),
            np.zeros((n, 2)),
            np.stack([rng.permutation(vocab)[:4] for _ in range(n)]),
            np.full((n, 4), -1.7),
            3.0,
        )
        for i in range(8)
    ]
    put_sequences(store, "a", sequences, vocab)
    clusters = ClusterReport(
        k=1, assignment={"a": 0}, members={0: ["a"]}, sizes={0: 1}, silhouette=None, centroids=[[1.0]]
    )
    store.put(f"{FED}/rounds/{ROUND}/clusters.json", clusters.model_dump_json().encode())
    spec = TrainSpec(
        student=StudentSpec(steps=6, batch_size=2),
        tune_steps=1,
        checkpoint_every=2,
        screen=False,
        metrics_every=1,
    )
    tokenizer = type(  # a vocabulary of `vocab` tokens, not shipped here
        "Tokenizer",
        (),
        {
            "__len__": lambda self: vocab,
            "get_vocab": lambda self: {f"t{i}": i for i in range(vocab)},
            "save_pretrained": lambda self, directory: None,
        },
    )()

    def die(metric: Metrics) -> None:
        if metric.phase == "phase II cluster 0" and metric.step == 3:
            raise _Killed

    with pytest.raises(_Killed):
        train_round(store, FED, ROUND, tiny_student(vocab), tokenizer, spec, sink=die)
    assert list(store.list(f"{FED}/rounds/{ROUND}/checkpoints/"))
    other = tiny_student(vocab)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.5)
    seen: list[Metrics] = []
    train_round(store, FED, ROUND, other, tokenizer, spec, sink=seen.append)
    steps = [m.step for m in seen if m.phase == "phase II cluster 0"]
    assert steps[0] == 1, steps  # started over; resuming would have begun at step 3


def test_a_killed_student_with_dropout_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """Dropout draws from torch's generator: the checkpoint carries its state, so the resumed steps
    drop what the uninterrupted run's did."""
    from transformers import Qwen2ForCausalLM

    from deepfusion.cloud.checkpoints import Checkpoints
    from deepfusion.shared.messages import Metrics

    config = tiny_student(64).config
    config.attention_dropout = 0.3
    torch.manual_seed(0)
    base = Qwen2ForCausalLM(config)
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, 64, 12) for _ in range(8)]
    epochs = {0: lambda e: window_batches(windows, 2, seed=e)}
    spec = StudentSpec(steps=6, batch_size=2)
    whole, _ = train_students(epochs, {0: base}, spec)

    checkpoints = Checkpoints(open_store(str(tmp_path / "store")), FED, ROUND, fingerprint="f")

    def die(metric: Metrics) -> None:
        if metric.step == 3:
            raise _Killed

    run = partial(
        train_students, epochs, {0: base}, spec, checkpoints=checkpoints, checkpoint_every=2, metrics_every=1
    )
    with pytest.raises(_Killed):
        run(sink=die)
    seen: list[Metrics] = []
    resumed, _ = run(sink=seen.append)
    assert [m.step for m in seen] == [3, 4, 5, 6]  # resumed after the checkpoint of step 2
    reference = whole[0].state_dict()
    for key, value in resumed[0].state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)


def test_a_checkpoint_written_on_a_gpu_resumes_on_a_machine_without_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.serialization

    from deepfusion.cloud.checkpoints import Checkpoints

    checkpoints = Checkpoints(open_store(str(tmp_path / "store")), FED, ROUND, fingerprint="f")
    with monkeypatch.context() as patched:
        # The bytes a GPU run writes: every storage tagged with its device.
        patched.setattr(torch.serialization, "location_tag", lambda storage: "cuda:1")
        checkpoints.save(0, {"trainer": {"weight": torch.ones(3)}, "done": False})
    state = checkpoints.load(0)
    assert state is not None and torch.equal(state["trainer"]["weight"], torch.ones(3))


@pytest.mark.slow
def test_the_tuned_moe_beats_the_plain_weight_average_of_its_students_on_every_domain(
    default_split: tuple[Path, SplitManifest],
) -> None:
    """Two students specialise on medical and finance text. Averaged, each loses its domain; merged,
    each keeps its FFN as a routed expert and phase III tunes the trunk and router on public text."""
    split_dir, split = default_split
    domains = ("medical", "finance")

    def docs(entry: FileEntry, n: int) -> list[str]:
        return [d.text for d in itertools.islice(read_jsonl(split_dir / entry.file), n)]

    private = {d: docs(split.devices[d][0], 120) for d in domains}
    public_docs = [t for name in (*domains, "general") for t in docs(split.public[name], 40)]
    tokenizer = train_byte_level_bpe([*public_docs, *(t for d in domains for t in private[d])], 512)
    tokenizer.add_special_tokens({"eos_token": END_OF_TEXT, "pad_token": END_OF_TEXT})
    heldout = {d: token_windows(tokenizer, docs(split.test[d], 16), 64)[:48] for d in domains}
    train = {d: token_windows(tokenizer, private[d], 64) for d in domains}
    public = token_windows(tokenizer, public_docs, 64)

    base = tiny_student(len(tokenizer))
    epochs = {c: (lambda e, d=d: window_batches(train[d], 8, seed=e)) for c, d in enumerate(domains)}
    students, _ = train_students(
        epochs, {0: base, 1: base}, StudentSpec(steps=200, batch_size=8, lr=3e-3, alpha=0.0, beta=0.0)
    )
    oracle = {d: evaluate_windows(students[c], heldout[d])["nll"] for c, d in enumerate(domains)}
    average = evaluate_domains(weight_average(list(students.values())), heldout)
    spec = TrainSpec(merge=MergeSpec(), tune_steps=30, tune_batch_size=8, tune_lr=2e-3)
    moe, _ = merge_and_tune(students, public, spec)
    merged = evaluate_domains(moe, heldout)

    for domain in domains:
        assert average[domain]["nll"] > oracle[domain] + 0.2, (domain, average, oracle)  # they specialised
        assert merged[domain]["nll"] < average[domain]["nll"] - 0.1, (domain, merged, average)


def _featured(store: ObjectStore, device: str, stages: int, patches: int, width: int = 8) -> None:
    """One packet from `device` of sequence 0 with features of stage 1 pooled into `patches` patches."""
    import hashlib

    from deepfusion.shared.packets import KnowledgePacket, PacketHeader, SequenceKnowledge, encode

    n, vocab = 6, 50
    rng = np.random.default_rng(len(device) + patches)
    header = PacketHeader(
        federation=FED, round=ROUND, device=device, shard="s", tokenizer="0" * 64, vocab_size=vocab,
        top_k=4, stages=stages, patches=patches, feature_stages=(1,), feature_width=width,
    )  # fmt: skip
    top = np.stack([rng.permutation(vocab)[:4] for _ in range(n)])
    features = rng.normal(size=(1, patches, width)).astype(np.float32)
    logprobs = np.full((n, 4), -1.7)
    knowledge = SequenceKnowledge(0, np.arange(n), np.zeros((n, 2)), top, logprobs, 2.0, features)
    data = encode(KnowledgePacket.from_sequences(header, [knowledge]))
    store.put(f"{FED}/rounds/{ROUND}/knowledge/{device}/{hashlib.sha256(data).hexdigest()}.dfk", data)


def test_a_packet_pooled_with_another_j_or_p_than_the_round_is_left_out(tmp_path: Path) -> None:
    """b's older packet has J=3, P=2 in a round of J=2, P=1: its features would not fit the VAA."""
    store = open_store(str(tmp_path / "store"))
    store.put(f"{FED}/rounds/{ROUND}/state.json", json.dumps({"spec": {"stages": 2, "patches": 1}}).encode())
    _featured(store, "a", stages=2, patches=1)
    _featured(store, "b", stages=3, patches=2)  # listed after a: the last packet must not set the round's J/P
    clusters = ClusterReport(
        k=1, assignment={"a": 0, "b": 0}, members={0: ["a", "b"]}, sizes={0: 2}, silhouette=None,
        centroids=[[1.0]],
    )  # fmt: skip
    index = index_round(store, FED, ROUND, clusters)
    assert (index.stages, index.patches) == (2, 1)
    (batch,) = cluster_batches(store, index, 0)
    assert [(r.device, r.weight) for r in batch.rows] == [("a", 1.0)]
    assert batch.rows[0].features is not None and batch.rows[0].features.shape == (1, 1, 8)


def test_evaluation_skips_windows_without_a_prediction() -> None:
    """A batch of empty windows would reach the model as [B, 0]; windows under 2 tokens predict nothing."""
    model = tiny_student(50)
    window = np.arange(1, 7)
    short = [np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.array([3])]
    assert evaluate_windows(model, [*short, window], batch_size=2) == evaluate_windows(model, [window])


def test_token_windows_with_a_limit_are_the_first_windows_and_stop_reading(tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = [f"Record {i}: the committee reviewed the results of the clinic. " * 6 for i in range(40)]
    every = token_windows(tokenizer, texts, 16)
    read: list[int] = []

    def reading() -> Iterator[str]:
        for i, text in enumerate(texts):
            read.append(i)
            yield text

    first = token_windows(tokenizer, reading(), 16, limit=7)
    assert len(every) > 7 * 3
    assert [w.tolist() for w in first] == [w.tolist() for w in every[:7]]
    assert len(read) < len(texts) // 2
