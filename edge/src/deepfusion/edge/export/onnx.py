"""HF checkpoint -> ONNX scoring graph (optimum's exporter), optionally int8 with ONNX Runtime.

The exported directory holds `model.onnx`, the tokenizer, `config.json` and `deepfusion-export.json`;
a graph too big for one protobuf file (2 GB) keeps its weights beside it in `model.onnx.data`.
`model.onnx` is optimum's `text-generation` graph (all-position logits, no KV cache) exported with
every hidden state as an output, then extended with a scoring head so that only k values per token
leave the session (a numpy log-softmax over a 49k vocabulary costs more than the forward):

    inputs   input_ids [B, T] int64, attention_mask [B, T] int64, (position_ids [B, T] int64),
             top_k [1] int64, next_ids [B, T] int64 (id of token t + 1; anything at the last position),
             pooling [B, P, T] float32 (`deepfusion.edge.features.pooling_matrix`)
    outputs  topk_logprobs [B, T, k] float32   TopK(LogSoftmax(logits))
             topk_ids      [B, T, k] int64
             target_logprob [B, T] float32     log p(next_ids) under the model
             pooled_hidden [B, L + 1, P, W] float32   pooling @ hidden_states[i] for every i = 0..L

Pooling all L + 1 hidden states costs P x T x W per layer, next to nothing, and lets one export
serve any J. int8 is `onnxruntime.quantization.quantize_dynamic` (QInt8 weights, one scale per
output channel) of the model's own MatMuls except the MLPs' down projections (`down_projections`);
the scoring head stays float32. `forward.onnx` (written with `keep_forward=True`) is the
same model with the logits as its only output: the plain-forward reference of the benchmarks.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from deepfusion.edge.errors import ErrorCode, ModelError, require
from deepfusion.edge.modelinfo import (
    EXPORT_MANIFEST,
    check_output_dir,
    checkpoint_config,
    shape_from_hf_config,
)

__all__ = ["ONNX_FAMILIES", "OnnxQuant", "down_projections", "export_onnx"]

OnnxQuant = Literal["fp32", "int8"]
# Dense decoder families whose export was checked against torch (tests/edge). MoE exports are refused:
# Qwen2-MoE does not export and DeepSeek-V3 exports with wrong numerics (measured with optimum 2.1).
ONNX_FAMILIES = ("llama", "qwen2", "gpt2", "mistral", "qwen3")
HEAD_PREFIX = "deepfusion_head/"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")
_DOWN_PROJECTION = re.compile(r"/mlp/(down_proj|c_proj)/")
# Protobuf refuses to serialize a message of 2 GiB or more (an fp32 model past about 500M parameters).
_PROTO_LIMIT = 2**31 - 2**24


def _optimum_export(model_dir: Path, raw_dir: Path, num_layers: int) -> None:
    """optimum's text-generation export, with hidden_states.0 .. hidden_states.L as extra outputs."""
    require("optimum.exporters.onnx")
    from optimum.exporters.onnx import main_export
    from optimum.exporters.tasks import TasksManager
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    constructor = TasksManager.get_exporter_config_constructor(
        exporter="onnx", model_type=config.model_type, task="text-generation", library_name="transformers"
    )
    base = constructor(config)

    class WithHiddenStates(type(base)):  # type: ignore[misc]
        @property
        def outputs(self) -> dict[str, dict[int, str]]:
            outputs = super().outputs
            for i in range(num_layers + 1):
                outputs[f"hidden_states.{i}"] = {0: "batch_size", 1: "sequence_length"}
            return outputs

    onnx_config = WithHiddenStates(config, task="text-generation")
    main_export(
        str(model_dir),
        output=str(raw_dir),
        task="text-generation",
        custom_onnx_configs={"model": onnx_config},
        model_kwargs={"output_hidden_states": True},
        no_post_process=True,
        do_validation=False,
        library_name="transformers",
    )


def _head_input(model: Any) -> str:
    """Name of the tensor the LM head multiplies: the last hidden state after the final norm.

    The exporter's `hidden_states.L` output is the last block's output *before* the final norm
    (transformers returns it after), so the last stage is taken from the LM head's input instead.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers["logits"]
    while node.op_type not in ("MatMul", "Gemm", "MatMulInteger"):
        if node.op_type not in ("Cast", "Identity", "Add", "Mul") or node.input[0] not in producers:
            raise ModelError(
                ErrorCode.CONVERSION_FAILED,
                f"cannot find the LM head in the exported graph (reached {node.op_type})",
                "report the model family; use the torch backend meanwhile",
            )
        node = producers[node.input[0]]
    return str(node.input[0])


def _add_scoring_head(model: Any, num_layers: int, last_hidden: str) -> Any:
    """Append LogSoftmax / TopK / target gather / stage pooling; drop logits and hidden outputs."""
    from onnx import TensorProto, helper

    graph = model.graph
    p = HEAD_PREFIX
    axes_last = helper.make_tensor(f"{p}axes_last", TensorProto.INT64, [1], [-1])
    axes_one = helper.make_tensor(f"{p}axes_one", TensorProto.INT64, [1], [1])
    graph.initializer.extend([axes_last, axes_one])
    # LogSoftmax (one fused MLAS kernel) is 4x faster in ONNX Runtime than ReduceLogSumExp or an
    # explicit max/sub/exp/sum chain; TopK over log-probs gives the same ids as over logits.
    nodes = [
        helper.make_node("LogSoftmax", ["logits"], [f"{p}logprobs"], axis=-1, name=f"{p}log_softmax"),
        helper.make_node(
            "TopK",
            [f"{p}logprobs", "top_k"],
            ["topk_logprobs", "topk_ids"],
            axis=-1,
            largest=1,
            sorted=1,
            name=f"{p}topk",
        ),
        helper.make_node("Unsqueeze", ["next_ids", f"{p}axes_last"], [f"{p}next"], name=f"{p}next"),
        helper.make_node(
            "GatherElements", [f"{p}logprobs", f"{p}next"], [f"{p}target"], axis=-1, name=f"{p}gather"
        ),
        helper.make_node("Squeeze", [f"{p}target", f"{p}axes_last"], ["target_logprob"], name=f"{p}target"),
    ]
    pooled = []
    for i in range(num_layers + 1):
        hidden = last_hidden if i == num_layers else f"hidden_states.{i}"
        nodes.append(helper.make_node("MatMul", ["pooling", hidden], [f"{p}pool{i}"], name=f"{p}pool{i}"))
        nodes.append(
            helper.make_node(
                "Unsqueeze", [f"{p}pool{i}", f"{p}axes_one"], [f"{p}stage{i}"], name=f"{p}stage{i}"
            )
        )
        pooled.append(f"{p}stage{i}")
    nodes.append(helper.make_node("Concat", pooled, ["pooled_hidden"], axis=1, name=f"{p}concat"))
    graph.node.extend(nodes)
    graph.input.extend(
        [
            helper.make_tensor_value_info("top_k", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("next_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info(
                "pooling", TensorProto.FLOAT, ["batch_size", "patches", "sequence_length"]
            ),
        ]
    )
    while len(graph.output):
        graph.output.pop()
    graph.output.extend(
        [
            helper.make_tensor_value_info(
                "topk_logprobs", TensorProto.FLOAT, ["batch_size", "sequence_length", "k"]
            ),
            helper.make_tensor_value_info(
                "topk_ids", TensorProto.INT64, ["batch_size", "sequence_length", "k"]
            ),
            helper.make_tensor_value_info(
                "target_logprob", TensorProto.FLOAT, ["batch_size", "sequence_length"]
            ),
            helper.make_tensor_value_info(
                "pooled_hidden", TensorProto.FLOAT, ["batch_size", num_layers + 1, "patches", "width"]
            ),
        ]
    )
    return model


def _save(model: Any, path: Path) -> None:
    """Check and write `model`; one too big for a protobuf file keeps its weights in `{name}.data`."""
    import onnx

    data = path.with_name(f"{path.name}.data")
    data.unlink(missing_ok=True)  # a previous, larger export's weights
    if sum(tensor.ByteSize() for tensor in model.graph.initializer) < _PROTO_LIMIT:
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
        return
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    onnx.checker.check_model(str(path))  # the in-memory check refuses a model past 2 GB too


def down_projections(model: Any) -> list[str]:
    """The MLPs' down projections: `mlp/down_proj` MatMuls, GPT-2's `mlp/c_proj` Gemms.

    int8 leaves them in float32: their input, the MLP's activations, carries the outliers that one
    dynamic int8 scale per tensor cannot hold. On SmolLM2-135M that takes int8's top-1 agreement with
    fp32 from 0.57 to 0.83 and its NLL gap from +0.66 to +0.06 nats (windows scored one at a time),
    for 20% more scoring time.
    """
    linear = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    found = [n for n in linear if _DOWN_PROJECTION.search(n.name)]
    # ONNX Runtime's quantizer first turns a Gemm into a MatMul named after it (replace_gemm_with_matmul).
    return [n.name if n.op_type == "MatMul" else f"{n.name}_MatMul" for n in found]


def _logits_only(model: Any) -> Any:
    from onnx import helper

    logits = next(o for o in model.graph.output if o.name == "logits")
    kept = helper.make_tensor_value_info(logits.name, logits.type.tensor_type.elem_type, None)
    kept.CopyFrom(logits)
    while len(model.graph.output):
        model.graph.output.pop()
    model.graph.output.append(kept)
    return model


def export_onnx(
    model_dir: str | Path,
    output_dir: str | Path,
    *,
    quant: OnnxQuant = "int8",
    keep_forward: bool = False,
) -> Path:
    """Export `model_dir` to `output_dir` (created or replaced); return `output_dir/model.onnx`."""
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    config = checkpoint_config(
        model_dir, ONNX_FAMILIES, "ONNX", "use the torch backend, or the GGUF export for Llama/Qwen2 models"
    )
    check_output_dir(model_dir, output_dir)
    shape = shape_from_hf_config(config)
    onnx = require("onnx")
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".export-") as tmp:
        raw_dir = Path(tmp) / "raw"
        try:
            _optimum_export(model_dir, raw_dir, shape.num_layers)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(
                ErrorCode.CONVERSION_FAILED,
                f"optimum could not export {model_dir} ({type(exc).__name__}: {exc})",
                "check that the checkpoint loads with AutoModelForCausalLM and is a supported family",
            ) from exc
        raw = raw_dir / "model.onnx"
        graph_only = onnx.load(str(raw), load_external_data=False)
        last_hidden = _head_input(graph_only)
        if quant == "int8":
            quantization = require("onnxruntime.quantization")
            quantized = Path(tmp) / "model.int8.onnx"
            quantization.quantize_dynamic(
                str(raw),
                str(quantized),
                weight_type=quantization.QuantType.QInt8,
                per_channel=True,
                nodes_to_exclude=down_projections(graph_only),
            )
            raw = quantized
        elif quant != "fp32":
            raise ModelError(ErrorCode.BAD_INPUT, f"unknown ONNX quantization {quant!r}", "use fp32 or int8")
        model = onnx.load(str(raw))
        if keep_forward:
            _save(_logits_only(onnx.load(str(raw))), output_dir / "forward.onnx")
        else:  # an earlier export's, which the backend's forward() would run in place of this model
            for stale in ("forward.onnx", "forward.onnx.data"):
                (output_dir / stale).unlink(missing_ok=True)
        _save(_add_scoring_head(model, shape.num_layers, last_hidden), output_dir / "model.onnx")
    for name in _TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, output_dir / name)
    manifest = {
        "format": "onnx",
        "quantization": quant,
        "shape": shape.__dict__,
        "hidden_states": shape.num_layers + 1,
        "source": str(model_dir),
    }
    (output_dir / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return output_dir / "model.onnx"
