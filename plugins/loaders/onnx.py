"""ONNX loader: forward passes run by onnxruntime; input gradients and graph-aware methods go through xai's torch graph (xaicli.graph).

The file is validated with onnx.checker first, so a corrupt download gets a clear message.
Input spec: defaults (see modelfile.py), then the ``xai.json`` entry of the model's
metadata_props, then the fixed dimensions of the graph input (the graph is what runs). A graph
whose batch dimension is a fixed number gets `Model.fixed_batch`: the Model runs it in chunks of that
many rows, the last one padded (`xaicli.graph.batch.in_chunks`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from xaicli import Loader, Param, hookimpl
from xaicli.errors import UsageError
from xaicli.model import GraphSource, Model

from .modelfile import checked_spec, describe_non_model, existing_file, file_digest, first_line, parse_xai_json


FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def claims(spec: str) -> bool:
    return spec.lower().endswith(".onnx")


def read_graph(path: Path) -> onnx.ModelProto:
    """The checked model proto without its weights (external data stays on disk)."""
    try:
        onnx.checker.check_model(str(path))
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # checker and protobuf raise several unrelated types
        raise UsageError(f"model file {path} is not a valid ONNX model: {why_invalid(path, exc)}") from exc


def why_invalid(path: Path, exc: Exception) -> str:
    """The checker's finding, or what the file seems to be when it does not even parse."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    message = first_line(exc)
    if head and not head.startswith(b"version https://git-lfs") and "Unable to parse proto" not in message:
        return message
    return describe_non_model(head)


def graph_input(proto: onnx.ModelProto, source: str) -> onnx.ValueInfoProto:
    """The single real input of the graph (initializers listed as inputs by old exporters excluded)."""
    weights = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise UsageError(f"model file {source} has {len(inputs)} inputs ({names}); xai needs one image input [B,C,H,W]")
    tensor = inputs[0].type.tensor_type
    if len(tensor.shape.dim) != 4:
        raise UsageError(f"model file {source}: input {inputs[0].name!r} has {len(tensor.shape.dim)} dimensions; "
                         "xai needs an image input [B,C,H,W]")
    if tensor.elem_type not in FLOAT_TYPES:
        raise UsageError(f"model file {source}: input {inputs[0].name!r} is {helper.tensor_dtype_to_np_dtype(tensor.elem_type)}; "
                         "xai feeds normalised floating-point images")
    return inputs[0]


def fixed_dims(value: onnx.ValueInfoProto) -> list[int | None]:
    """Each dimension's size, or None where it is symbolic."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in value.type.tensor_type.shape.dim]


def spec_fields(proto: onnx.ModelProto, dims: list[int | None], source: str) -> tuple[dict[str, Any], list[str] | None]:
    """Input spec fields and labels: metadata xai.json, overridden by fixed graph dimensions."""
    meta = {p.key: p.value for p in proto.metadata_props}
    fields, labels = parse_xai_json(meta["xai.json"], source) if "xai.json" in meta else ({}, None)
    _, channels, height, width = dims
    if channels is not None:
        fields["channels"] = channels
    if height is not None and width is not None:
        fields["size"] = [height, width]
    return fields, labels


def session(path: Path, device: torch.device, threads: int | None) -> ort.InferenceSession:
    """An onnxruntime session on CUDA when `device` is cuda and onnxruntime has it, else on the CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # e.g. an operator onnxruntime does not implement
        raise UsageError(f"model file {path}: onnxruntime cannot run it: {first_line(exc)}") from exc


def logits_output(sess: ort.InferenceSession, source: str) -> str:
    """The name of the first graph output, checked to be logits [B, classes] where its rank is known."""
    first = sess.get_outputs()[0]
    if isinstance(first.shape, list) and len(first.shape) != 2:
        raise UsageError(f"model file {source}: output {first.name!r} has shape {first.shape}; xai needs logits [B, classes]")
    return first.name


def forward(sess: ort.InferenceSession, output: str, dtype: np.dtype, device: torch.device
            ) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [B,C,H,W] torch on `device` -> float32 logits on `device` from graph output `output`."""
    name = sess.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu").numpy().astype(dtype, copy=False)
        (logits,) = sess.run([output], {name: np.ascontiguousarray(array)})
        return torch.from_numpy(logits).to(device=device, dtype=torch.float32)

    return run


def load(spec: str, device: torch.device, threads: int | None = None) -> Model:
    """An onnxruntime session wrapped as a Model (forward passes through onnxruntime)."""
    path = existing_file(spec, "ONNX model file")
    proto = read_graph(path)
    value = graph_input(proto, spec)
    dims = fixed_dims(value)
    fields, labels = spec_fields(proto, dims, spec)
    sess = session(path, device, threads)
    output = logits_output(sess, spec)
    dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
    return Model(
        name=path.stem,
        spec=checked_spec(fields, spec),
        device=device,
        forward_fn=forward(sess, output, dtype, device),
        labels=labels,
        digest=file_digest(path),
        source=spec,
        graph_source=GraphSource("onnx", path=path),
        fixed_batch=dims[0],
        extra={"providers": sess.get_providers(), "threads": sess.get_session_options().intra_op_num_threads},
    )


@hookimpl
def xai_loaders() -> list[Loader]:
    return [
        Loader(
            "onnx",
            "ONNX file run by onnxruntime (gradients through xai's torch graph); spec from metadata xai.json and the input shape",
            claims,
            load,
            (Param("threads", int, None, "onnxruntime intra-op threads (default: torch.get_num_threads())", low=1,
                    high=1024),),
        )
    ]
