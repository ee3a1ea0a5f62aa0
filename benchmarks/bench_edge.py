"""Edge scoring throughput: plain forward vs the full scoring path, per backend and quantization.

    python benchmarks/bench_edge.py                       # tiny-llama and SmolLM2-135M, every backend
    python benchmarks/bench_edge.py --models tiny-llama --threads 2 --tokens 2048

For each (model, backend, quantization), in a fresh process (so peak RSS is its own):
- forward: prompt processing with all-position logits (`Backend.forward`), tokens/s;
- scoring: the whole path to bytes (`Backend.score` with top-k, log-softmax, NLL and J x P features,
  then `SequenceKnowledge` and `PacketBuilder` encoding), tokens/s;
- the ratio of the two (goal: >= 0.9), the model file size and the process's peak RSS.
Both passes run on the same windows of public text after one warm-up pass; the best of `--repeats`.
Exports are cached under $DEEPFUSION_CACHE/bench-edge/ (SmolLM2's take a few minutes the first time),
in folders named after a hash of the export code, so a changed exporter is measured, never a stale file.
Results go to results/bench_edge.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONFIGS = (
    ("torch", "fp32"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
    ("llama_cpp", "f16"),
    ("llama_cpp", "q8_0"),
    ("llama_cpp", "q4_k_m"),
)
TOP_K, STAGES, PATCHES, WINDOW = 32, 4, 4, 256


def _base_model(name: str, cache: Path) -> Path:
    if name == "smollm2-135m":
        from deepfusion.cloud.zoo.smollm2 import smollm2_dir

        return smollm2_dir(cache)
    from deepfusion.cloud.zoo.presets import get_preset
    from deepfusion.cloud.zoo.pretrain import PretrainSpec, pretrain_base, token_stream
    from deepfusion.cloud.zoo.tokenizer import federation_tokenizer, load_tokenizer
    from deepfusion.shared.corpora import SplitSpec, prepare_splits, read_jsonl

    split_dir, split = prepare_splits(cache, SplitSpec())
    public = [(split_dir / entry.file, entry) for entry in split.public.values()]
    tokenizer_dir = federation_tokenizer(public, cache, 4096)
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = token_stream(tokenizer, (d.text for path, _ in public for d in read_jsonl(path)))
    return pretrain_base(get_preset(name), tokenizer_dir, ids, cache, PretrainSpec())


def _exporter_hash() -> str:
    """Hash of the export package's sources: the cache key that makes an exporter change re-export."""
    import deepfusion.edge.export as package

    digest = hashlib.sha256()
    for source in sorted(Path(package.__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:12]


def _cached_folder(root: Path, prefix: str) -> Path:
    """`root/{prefix}-{exporter hash}`, after removing the exports of other exporter versions."""
    folder = root / f"{prefix}-{_exporter_hash()}"
    for stale in root.glob(f"{prefix}*"):
        if stale != folder and stale.is_dir():
            shutil.rmtree(stale)
    return folder


def _artifact(model: str, backend: str, quant: str, cache: Path) -> Path:
    base = _base_model(model, cache)
    if backend == "torch":
        return base
    root = cache / "bench-edge" / f"{model}-{base.name}"
    if backend == "onnxruntime":
        from deepfusion.edge.export.onnx import export_onnx

        target = _cached_folder(root, f"onnx-{quant}")
        if not (target / "forward.onnx").is_file():
            export_onnx(base, target, quant=quant, keep_forward=True)  # type: ignore[arg-type]
        return target
    from deepfusion.edge.export.gguf import export_gguf

    target = _cached_folder(root, f"gguf-{quant}") / f"model.{quant}.gguf"
    if not target.is_file():
        export_gguf(base, target.parent, quant=quant)  # type: ignore[arg-type]
    return target


def _windows(model_path: Path, tokens: int, cache: Path) -> list[np.ndarray]:
    from deepfusion.edge.modelinfo import load_tokenizer
    from deepfusion.edge.scoring import windows
    from deepfusion.shared.corpora import SplitSpec, prepare_splits, read_jsonl

    split_dir, split = prepare_splits(cache, SplitSpec())
    texts = (d.text for d in read_jsonl(split_dir / split.public["general"].file))
    full = [w for w in windows(load_tokenizer(model_path), texts, WINDOW) if len(w.token_ids) == WINDOW]
    return [w.token_ids for w in full[: max(1, tokens // WINDOW)]]


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    names = ("model.onnx",) if (path / "model.onnx").is_file() else ()
    files = [path / n for n in names] or [f for f in path.glob("*.safetensors")]
    return sum(f.stat().st_size for f in files)


def run_one(model: str, backend_name: str, quant: str, threads: int, tokens: int, repeats: int) -> dict:
    from deepfusion.edge.backends import load_backend
    from deepfusion.edge.modelinfo import load_tokenizer
    from deepfusion.edge.scoring import Window, to_knowledge
    from deepfusion.shared.corpora import resolve_cache_root
    from deepfusion.shared.fingerprint import tokenizer_fingerprint
    from deepfusion.shared.packets import PacketBuilder, PacketHeader

    cache = resolve_cache_root()
    path = _artifact(model, backend_name, quant, cache)
    windows = _windows(path, tokens, cache)
    n_tokens = sum(len(w) for w in windows)
    vocab = load_tokenizer(path).get_vocab(with_added_tokens=True)
    backend = load_backend(backend_name, path, threads=threads)
    stages = backend.capabilities.feature_stages(backend.shape.num_layers, STAGES)
    header = PacketHeader(
        federation="bench", round=0, device="bench", shard="bench", tokenizer=tokenizer_fingerprint(vocab),
        vocab_size=backend.shape.vocab_size, top_k=TOP_K, stages=STAGES, patches=PATCHES,
        feature_stages=stages, feature_width=backend.shape.hidden_size,
    )  # fmt: skip
    id_dtype = np.uint16 if header.vocab_size < 2**16 else np.uint32

    def scoring() -> int:
        builder = PacketBuilder(header)
        packets = 0
        for start in range(0, len(windows), 8):
            chunk = windows[start : start + 8]
            scores = backend.score(chunk, top_k=TOP_K, stages=STAGES, patches=PATCHES)
            for i, (ids, score) in enumerate(zip(chunk, scores, strict=True)):
                offsets = np.stack([np.arange(len(ids)), np.arange(len(ids)) + 1], axis=1)
                window = Window(start + i, 0, 0, len(ids), ids, offsets)
                packets += len(builder.add(to_knowledge(window, score, None, id_dtype)))
        return packets + len(builder.flush())

    def forward() -> None:
        for start in range(0, len(windows), 8):
            backend.forward(windows[start : start + 8])

    def timed(fn) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    forward()  # warm-up (ONNX Runtime and llama.cpp allocate on the first run)
    scoring()
    # Interleaved, best of `repeats`: on a shared machine, load drifts between passes.
    forward_times, scoring_times = [], []
    for _ in range(repeats):
        forward_times.append(timed(forward))
        scoring_times.append(timed(scoring))
    forward_s, scoring_s = min(forward_times), min(scoring_times)
    backend.close()
    return {
        "model": model,
        "backend": backend_name,
        "quant": quant,
        "tokens": n_tokens,
        "forward_tok_s": n_tokens / forward_s,
        "scoring_tok_s": n_tokens / scoring_s,
        "ratio": forward_s / scoring_s,
        "feature_stages": list(stages),
        "file_mb": _size(path) / 1e6,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": threads,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "smollm2-135m"])
    parser.add_argument("--configs", nargs="+", default=[f"{b}:{q}" for b, q in CONFIGS])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=2048, help="Tokens per pass (windows of 256).")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "BACKEND", "QUANT"), help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=Path("results/bench_edge.json"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.threads, args.tokens, args.repeats)))
        return
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for model in args.models:
        for config in args.configs:
            backend, quant = config.split(":")
            command = [sys.executable, __file__, "--one", model, backend, quant]
            command += [
                "--threads",
                str(args.threads),
                "--tokens",
                str(args.tokens),
                "--repeats",
                str(args.repeats),
            ]
            done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0:
                print(f"{model} {config} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rows, indent=2) + "\n")
    print(
        "| model | backend | weights | forward tok/s | scoring tok/s | ratio | feature stages "
        "| file MB | peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['backend']} | {r['quant']} | {r['forward_tok_s']:,.0f} "
            f"| {r['scoring_tok_s']:,.0f} "
            f"| {r['ratio']:.2f} | {','.join(map(str, r['feature_stages'])) or '-'} | {r['file_mb']:,.1f} "
            f"| {r['peak_rss_mb']:,.0f} |"
        )


if __name__ == "__main__":
    main()
