"""ONNX forms of CNN families that the converter must take: hrnet's nearest upsampling (Resize with its
scales in a Constant node) and nf-nets' weight standardisation (BatchNormalization in training mode on
a weight). The graph of each exported file matches the model at a batch other than the export's."""
from __future__ import annotations

import io

import numpy as np
import onnx
import timm
import torch
from timm.layers import ScaledStdConv2d, StdConv2d
from torch import nn

from xaicli.graph import from_onnx
from xaicli.graph.onnx_ops import OPS, Attrs


def exported(module: nn.Module, size: int = 16) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(module, (torch.randn(2, 3, size, size),), buffer, dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue())


def assert_matches(module: nn.Module, size: int = 16) -> None:
    graph = from_onnx(exported(module, size))
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(graph(x), module(x), rtol=1e-4, atol=1e-5)


def head(channels: int) -> list[nn.Module]:
    return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 5)]


def test_nearest_upsampling_with_constant_scales():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Upsample(scale_factor=2, mode="nearest"),
                           nn.Conv2d(4, 4, 3, padding=1), *head(4)).eval()
    assert any(n.op_type == "Resize" for n in exported(module).graph.node)
    assert_matches(module)


def test_weight_standardised_convolutions():
    torch.manual_seed(0)
    module = nn.Sequential(StdConv2d(3, 4, 3, padding=1), nn.ReLU(), ScaledStdConv2d(4, 6, 3, padding=1),
                           *head(6)).eval()
    assert any(n.op_type == "BatchNormalization" and any(a.name == "training_mode" and a.i for a in n.attribute)
               for n in exported(module).graph.node)
    assert_matches(module)


def test_batch_norm_in_training_mode_gives_running_statistics_as_onnx_defines():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
    scale, bias = rng.standard_normal(3).astype(np.float32), rng.standard_normal(3).astype(np.float32)
    mean, var = rng.standard_normal(3).astype(np.float32), rng.random(3).astype(np.float32) + 0.5
    y, running_mean, running_var = OPS["BatchNormalization"](
        Attrs(training_mode=1, momentum=0.8, epsilon=1e-3), *map(torch.from_numpy, (x, scale, bias, mean, var)), outputs=3)
    current_mean, current_var = x.mean((0, 2, 3)), x.var((0, 2, 3))
    want = (x - current_mean[:, None, None]) / np.sqrt(current_var[:, None, None] + 1e-3) * scale[:, None, None] \
        + bias[:, None, None]
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(running_mean.numpy(), mean * 0.8 + current_mean * 0.2, rtol=1e-5)
    np.testing.assert_allclose(running_var.numpy(), var * 0.8 + current_var * 0.2, rtol=1e-5)


def test_an_op_that_cannot_be_converted_is_named_in_one_line():
    """Resize scales computed from the input's values: torch.export cannot trace them (its own message
    runs to a dozen lines); the error names the node and keeps the first line of the cause."""
    from onnx import TensorProto, helper

    from xaicli.errors import UsageError

    nodes = [helper.make_node("ReduceMax", ["x"], ["peak"], keepdims=0),
             helper.make_node("Abs", ["peak"], ["size"]),
             helper.make_node("Add", ["size", "two"], ["factor"]),
             helper.make_node("Unsqueeze", ["factor", "axis"], ["factor1"]),
             helper.make_node("Concat", ["ones", "factor1", "factor1"], ["scales"], axis=0),
             helper.make_node("Resize", ["x", "", "scales"], ["up"], name="data_dependent_resize", mode="nearest",
                              coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
             helper.make_node("GlobalAveragePool", ["up"], ["pooled"]),
             helper.make_node("Flatten", ["pooled"], ["y"])]
    consts = [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
              helper.make_tensor("axis", TensorProto.INT64, [1], [0]),
              helper.make_tensor("ones", TensorProto.FLOAT, [2], [1.0, 1.0])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    try:
        from_onnx(model, torch.randn(2, 3, 8, 8))
    except UsageError as exc:
        message = str(exc)
    else:
        raise AssertionError("a data-dependent Resize converted")
    assert "data_dependent_resize" in message and "\n" not in message, message


def test_gcvit_repeats_by_a_one_hot_and_edgenext_sums_positions():
    """gcvit repeats its global query over the windows, which the TorchScript-based exporter writes as a
    Tile by a OneHot of [1, windows per image]; edgenext's Fourier positions are a CumSum."""
    torch.manual_seed(0)
    module = timm.create_model("gcvit_xxtiny", pretrained=False, num_classes=5).eval()  # needs 224 px
    assert {"Tile", "OneHot"} <= {n.op_type for n in exported(module, 224).graph.node}
    assert_matches(module, 224)
    module = timm.create_model("edgenext_xx_small", pretrained=False, num_classes=5).eval()
    assert "CumSum" in {n.op_type for n in exported(module, 64).graph.node}
    assert_matches(module, 64)


def test_cumsum_and_one_hot_match_numpy():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    for exclusive in (0, 1):
        for reverse in (0, 1):
            got = OPS["CumSum"](Attrs(exclusive=exclusive, reverse=reverse), torch.from_numpy(x), 2).numpy()
            flipped = x[..., ::-1] if reverse else x
            want = np.cumsum(flipped, 2) - (flipped if exclusive else 0)
            np.testing.assert_array_equal(got, want[..., ::-1] if reverse else want)
    indices = np.array([[0, -1], [2, 7]])
    for axis in (-1, 0, 1):
        got = OPS["OneHot"](Attrs(axis=axis), torch.from_numpy(indices), 4, torch.tensor([2.0, 5.0])).numpy()
        hot = (np.where(indices < 0, indices + 4, indices)[..., None] == np.arange(4))
        want = np.where(np.moveaxis(hot, -1, axis if axis >= 0 else 2), 5.0, 2.0)  # index 7: a row of 2s
        np.testing.assert_array_equal(got, want)
    assert OPS["OneHot"](Attrs(), [1], 5, [1, 3]).tolist() == [[1, 3, 1, 1, 1]]  # shape arithmetic stays numbers
