"""xaicli.graph on small models: the contract, the three sources, gradients, Model integration,
parameter isolation, layer names and the ONNX converter's ops across opsets."""
from __future__ import annotations

import operator

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from xaicli.errors import UsageError
from xaicli.graph import find_node, from_module, from_onnx, from_torchscript, layer_names
from xaicli.model import GraphSource, InputSpec, Model, check_needs, input_gradient
from xaicli_plugins.loaders import onnx as onnx_loader

CPU = torch.device("cpu")
FORMATS = ("eager", "torchscript", "onnx")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def assert_contract(gm: torch.fx.GraphModule) -> None:
    """One input, one output, ATen ops only (plus batch-size arithmetic), real attributes."""
    nodes = list(gm.graph.nodes)
    assert [n.name for n in nodes if n.op == "placeholder"] == ["x"]
    assert [n.op for n in nodes].count("output") == 1
    state = dict(gm.named_parameters()) | dict(gm.named_buffers())
    for node in nodes:
        assert node.op in ("placeholder", "get_attr", "call_function", "output"), node.format_node()
        if node.op == "get_attr":
            assert node.target in state, node.target
        if node.op == "call_function" and not isinstance(node.target, torch._ops.OpOverload):
            assert node.target in (operator.mul, operator.add, operator.sub, operator.floordiv), node.format_node()
        if isinstance(node.target, torch._ops.OpOverload):
            assert node.target.namespace == "aten" and not node.target._schema.is_mutable, node.format_node()


# ------------------------------------------------------------------ the digits CNN, three formats

@pytest.fixture(scope="module")
def graphs(digits) -> dict[str, torch.fx.GraphModule]:
    example = digits.x[:2]
    return {
        "eager": from_module(digits.module, example),
        "torchscript": from_torchscript(torch.jit.load(str(digits.torchscript)), example),
        "onnx": from_onnx(digits.onnx),
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_digits_graph_matches_model_for_any_batch(graphs, digits, fmt):
    gm = graphs[fmt]
    assert_contract(gm)
    with torch.no_grad():
        for batch in (digits.x[:1], digits.x[:3], digits.x):
            assert rel_err(gm(batch), digits.module(batch)) <= 1e-5


def test_digits_graphs_agree_on_layers_across_formats(graphs):
    """Weighted layers get their module names from every source; conv/linear/pool node kinds agree."""
    def layers(gm, kinds):
        return [n.meta["layer"] for n in gm.graph.nodes if n.op == "call_function" and n.target._opname in kinds]

    eager = layers(graphs["eager"], {"conv2d", "linear"})
    assert eager == ["0", "4", "8", "13"]
    assert layers(graphs["torchscript"], {"conv2d", "linear"}) == eager
    assert layers(graphs["onnx"], {"conv2d", "linear"}) == eager
    pools = {"max_pool2d", "adaptive_avg_pool2d"}
    assert len(layers(graphs["onnx"], pools)) == len(layers(graphs["eager"], pools)) == 3
    assert layers(graphs["torchscript"], {"batch_norm"}) == layers(graphs["eager"], {"batch_norm"}) == ["1", "5", "9"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_gradients_through_graph_equal_eager_gradients(graphs, digits, fmt):
    x, target = digits.x[:5], digits.y[:5]
    eager = Model("digits", digits.spec, CPU, module=digits.module)
    on_graph = Model("digits", digits.spec, CPU, module=graphs[fmt])
    want, logit = input_gradient(eager, x, target)
    got, got_logit = input_gradient(on_graph, x, target)
    assert rel_err(got, want) <= 1e-4 and rel_err(got_logit, logit) <= 1e-5


def test_onnx_model_is_differentiable_through_its_graph(digits):
    """Loaded by the ONNX plugin: gradients (check_needs, input_gradient) go through the converted
    graph; plain forwards still run on onnxruntime; the graph is built once."""
    model = onnx_loader.load(str(digits.onnx), CPU)
    calls = []
    forward = model.forward_fn
    model.forward_fn = lambda x: calls.append(len(x)) or forward(x)
    assert model.differentiable
    check_needs(model, "gradient", "saliency")
    graph = model.graph()
    assert model.graph() is graph
    calls.clear()
    grad, _ = input_gradient(model, digits.x[:4], digits.y[:4])
    assert calls == []
    want, _ = input_gradient(Model("digits", digits.spec, CPU, module=digits.module), digits.x[:4], digits.y[:4])
    assert rel_err(grad, want) <= 1e-4
    model.predict(digits.x[:4])
    assert calls == [4]


def test_model_graph_follows_its_source(digits):
    """dataclasses.replace(model, module=...) gets a graph of the new module, not the cached one."""
    from dataclasses import replace

    model = Model("digits", digits.spec, CPU, module=digits.module)
    shifted = replace(model, module=nn.Sequential(digits.module, nn.Flatten()).eval())
    x = digits.x[:2]
    with torch.no_grad():
        assert rel_err(model.graph()(x), digits.module(x)) <= 1e-6
        assert shifted.graph() is not model.graph() and model.graph() is model.graph()


def test_graph_parameters_are_copies(digits):
    module = digits.module
    gm = from_module(module, digits.x[:2])
    own = dict(module.named_parameters()) | dict(module.named_buffers())
    state = dict(gm.named_parameters()) | dict(gm.named_buffers())
    assert set(state) <= set(own) and "0.weight" in state and "1.running_mean" in state
    assert all(state[k].data_ptr() != own[k].data_ptr() for k in state)
    x = digits.x[:3]
    with torch.no_grad():
        before, graph_before = module(x), gm(x)
        gm.get_parameter("0.weight").mul_(-1)
        assert torch.equal(module(x), before)
        gm.get_parameter("0.weight").mul_(-1)
        module[0].weight.add_(1.0)
        try:
            assert torch.equal(gm(x), graph_before)
        finally:
            module[0].weight.sub_(1.0)


# ------------------------------------------------------------------ names

class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn1(self.conv1(x)) + x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.block = Block(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_layer_names_and_find_node():
    gm = from_module(Net().eval(), torch.randn(2, 3, 10, 10))
    assert layer_names(gm) == ["stem", "block.conv1", "block.bn1", "block.add", "block.relu", "mean", "head"]
    assert find_node(gm, "block.conv1").target == torch.ops.aten.conv2d.default
    assert find_node(gm, "block_conv1") is find_node(gm, "block.conv1")
    assert find_node(gm, "block").meta["layer"] == "block.relu"  # a module's output: its last node
    with pytest.raises(UsageError, match=r"no layer 'block.conv2'.*block\.conv1"):
        find_node(gm, "block.conv2")


# ------------------------------------------------------------------ the ONNX converter

def onnx_model(nodes, inits: dict[str, np.ndarray], opset: int, shape=("N", 4, 8, 8)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "K"])],
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10 if opset >= 21 else 8)
    onnx.checker.check_model(model)
    return model


def run_ort(model: onnx.ModelProto, x: torch.Tensor) -> torch.Tensor:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"x": x.numpy()})[0])


def assert_matches_ort(model: onnx.ModelProto, shape=(4, 8, 8)) -> torch.fx.GraphModule:
    gm = from_onnx(model)
    assert_contract(gm)
    for batch in (1, 3):
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert rel_err(gm(x), run_ort(model, x)) <= 1e-5, batch
    return gm


def rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + len(shape)).standard_normal(shape).astype(np.float32)


def small_cnn(constant_nodes: bool) -> onnx.ModelProto:
    """Conv-BN-ReLU-pool-Gemm with weights as initializers or as Constant nodes."""
    weights = {"w": rand(6, 4, 3, 3), "b": rand(6), "scale": rand(6) ** 2, "shift": rand(6), "mean": rand(6),
               "var": rand(6) ** 2 + 0.5, "fc": rand(6, 5), "fc_b": rand(5)}
    n = helper.make_node
    body = [
        n("Conv", ["x", "w", "b"], ["c"], name="/features/conv/Conv", pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["bn"], name="/features/bn/BatchNormalization",
          epsilon=1e-3),
        n("Relu", ["bn"], ["r"], name="/features/relu/Relu"),
        n("MaxPool", ["r"], ["p"], name="/pool/MaxPool", kernel_shape=[2, 2], strides=[2, 2]),
        n("GlobalAveragePool", ["p"], ["g"], name="/avg/GlobalAveragePool"),
        n("Flatten", ["g"], ["f"], name="/Flatten"),
        n("Gemm", ["f", "fc", "fc_b"], ["y"], name="/head/Gemm", alpha=0.5),
    ]
    if not constant_nodes:
        return onnx_model(body, weights, 17)
    consts = [n("Constant", [], [k], value=numpy_helper.from_array(v, k)) for k, v in weights.items()]
    return onnx_model(consts + body, {}, 17)


def test_onnx_constant_nodes_and_initializers_give_the_same_graph():
    graphs = [assert_matches_ort(small_cnn(constant_nodes)) for constant_nodes in (False, True)]
    for gm in graphs:
        kinds = [n.target._opname for n in gm.graph.nodes if n.op == "call_function"]
        assert kinds == ["conv2d", "batch_norm", "relu", "max_pool2d", "adaptive_avg_pool2d", "reshape", "linear"]
        assert layer_names(gm)[:3] == ["features.conv", "features.bn", "features.relu"]
        assert {"features.conv.weight", "features.bn.running_var", "head.weight"} <= set(gm.state_dict())
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(graphs[0](x), graphs[1](x), atol=1e-6)


def zoo(opset: int) -> onnx.ModelProto:
    """Most supported ops, with the inputs/attributes that moved across opsets 13-21."""
    n = helper.make_node
    ints = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    inits = {
        "w1": rand(8, 4, 3, 3), "b1": rand(8), "w2": rand(8, 2, 3, 3), "s": rand(8) ** 2, "t": rand(8),
        "m": rand(8), "v": rand(8) ** 2 + 0.5, "lo": np.array(-0.5, np.float32), "hi": np.array(2.0, np.float32),
        "pads": ints(0, 0, 1, 1, 0, 0, 1, 1), "split": ints(3, 5), "i0": np.array(0, np.int64), "ax0": ints(0),
        "ax1": ints(1), "minus1": ints(-1), "st": ints(1), "en": ints(5), "gw": rand(72, 10), "gb": rand(10),
        "row": rand(1, 10), "ten": ints(10), "tenth": np.array(0.1, np.float32), "gamma": rand(72), "beta": rand(72),
        "wt": rand(8, 3, 2, 2),
    }
    reduce = (n("ReduceMean", ["sp1", "ax1"], ["r"], keepdims=1) if opset >= 18
              else n("ReduceMean", ["sp1"], ["r"], axes=[1], keepdims=1))
    norm = (n("LayerNormalization", ["rs", "gamma", "beta"], ["ln"], epsilon=1e-5) if opset >= 17
            else n("Softmax", ["rs"], ["ln"], axis=-1))
    act = n("Gelu", ["sq"], ["act"]) if opset >= 20 else n("Tanh", ["sq"], ["act"])
    swish = n("HardSwish", ["bn"], ["hs"]) if opset >= 14 else n("Relu", ["bn"], ["hs"])
    nodes = [
        n("Shape", ["x"], ["shape"]), n("Gather", ["shape", "i0"], ["batch"], axis=0),
        n("Unsqueeze", ["batch", "ax0"], ["batch1"]), n("Concat", ["batch1", "minus1"], ["flat"], axis=0),
        n("Concat", ["batch1", "ten"], ["bk"], axis=0),
        n("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        n("Conv", ["c1", "w2"], ["c2"], group=4, pads=[0, 1, 2, 1]),
        n("BatchNormalization", ["c2", "s", "t", "m", "v"], ["bn"]),
        swish, n("Clip", ["hs", "lo", "hi"], ["cl"]),
        n("MaxPool", ["cl"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        n("Pad", ["p", "pads"], ["pd"], mode="constant"),
        n("AveragePool", ["pd"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0),
        n("Split", ["ap", "split"], ["sp0", "sp1"], axis=1), reduce,
        n("Sigmoid", ["r"], ["sg"]), n("Mul", ["sp0", "sg"], ["m0"]),
        n("ConvTranspose", ["ap", "wt"], ["ct"], strides=[2, 2], pads=[1, 1, 1, 1]),
        n("GlobalAveragePool", ["ct"], ["ctg"]), n("Add", ["m0", "ctg"], ["m1"]),
        n("Transpose", ["m1"], ["tr"], perm=[0, 2, 3, 1]),
        n("Slice", ["tr", "st", "en", "ax1"], ["sl"]), n("Reshape", ["sl", "flat"], ["rs"]), norm,
        n("Gemm", ["ln", "gw", "gb"], ["gm"], alpha=0.5, beta=2.0),
        n("Unsqueeze", ["gm", "ax1"], ["us"]), n("Squeeze", ["us", "ax1"], ["sq"]), act,
        n("Expand", ["row", "bk"], ["ex"]), n("Add", ["act", "ex"], ["sum"]),
        n("Greater", ["sum", "i0f"], ["pos"]), n("Mul", ["sum", "tenth"], ["leak"]),
        n("Where", ["pos", "sum", "leak"], ["wh"]), n("LeakyRelu", ["wh"], ["lr"], alpha=0.2),
        n("Pow", ["lr", "two"], ["sqr"]), n("Sqrt", ["sqr"], ["ab"]), n("Neg", ["ab"], ["ng"]), n("Exp", ["ng"], ["e"]),
        n("HardSigmoid", ["e"], ["hsg"], alpha=0.3), n("Softmax", ["hsg"], ["y"], axis=-1),
    ]
    inits |= {"i0f": np.array(0.0, np.float32), "two": np.array(2.0, np.float32)}
    return onnx_model(nodes, inits, opset)


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
def test_onnx_ops_across_opsets_match_onnxruntime(opset):
    gm = assert_matches_ort(zoo(opset))
    kinds = {n.target._opname for n in gm.graph.nodes if n.op == "call_function"}
    assert not kinds & {"view", "transpose", "flatten", "split", "_native_batch_norm_legit_no_training"}
    assert {"conv2d", "batch_norm", "hardtanh", "linear", "conv_transpose2d", "reshape", "clamp"} <= kinds
    assert ("gelu" in kinds) == (opset >= 20) and ("layer_norm" in kinds) == (opset >= 17)


def test_onnx_more_ops_match_onnxruntime():
    """Indexing, tiling, einsum, normalisation and activation ops not in the zoo above."""
    n = helper.make_node
    ints = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    inits = {"idx": ints(3, 0, 2, 1), "rep": ints(1, 1, 2, 1), "s": rand(4), "b": rand(4), "slope": rand(4, 1, 1) ** 2,
             "proj": rand(4, 5), "zero": np.array(0, np.int64), "four": np.array(4, np.int64), "one": np.array(1, np.int64),
             "rows": ints(-1, 4), "rows_n": ints(4)}
    nodes = [
        n("Gather", ["x", "idx"], ["g"], axis=1), n("Tile", ["g", "rep"], ["t"]),
        n("InstanceNormalization", ["x", "s", "b"], ["inorm"], epsilon=1e-4), n("PRelu", ["inorm", "slope"], ["pr"]),
        n("Elu", ["pr"], ["el"]), n("GlobalMaxPool", ["el"], ["gmp"]), n("Add", ["t", "gmp"], ["mixed"]),
        n("Range", ["zero", "four", "one"], ["r"]), n("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
        n("ConstantOfShape", ["rows_n"], ["ones"], value=numpy_helper.from_array(np.array([1.0], np.float32))),
        n("Identity", ["mixed"], ["ident"]), n("Dropout", ["ident"], ["drop"]),
        n("Flatten", ["drop"], ["flat"], axis=2), n("ReduceMax", ["flat"], ["rmax"], axes=[1], keepdims=1),
        n("Reshape", ["rmax", "rows"], ["per_channel"]), n("Add", ["per_channel", "rf"], ["shifted"]),
        n("Mul", ["shifted", "ones"], ["scaled"]),
        n("Einsum", ["scaled", "proj"], ["e"], equation="bk,kj->bj"), n("Abs", ["e"], ["ab"]),
        n("Reciprocal", ["ab"], ["rc"]), n("Softplus", ["rc"], ["sp"]), n("Min", ["sp", "e"], ["y"]),
    ]
    assert_matches_ort(onnx_model(nodes, inits, 17))


def test_onnx_erf_gelu_and_matmul_add_become_gelu_and_linear():
    n = helper.make_node
    inits = {"w": rand(16, 12), "b": rand(12), "sqrt2": np.array(np.sqrt(2), np.float32),
             "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32), "shape": np.array([-1, 16], np.int64)}
    nodes = [
        n("Reshape", ["x", "shape"], ["f"]), n("MatMul", ["f", "w"], ["mm"], name="/fc1/MatMul"),
        n("Add", ["b", "mm"], ["h"], name="/fc1/Add"), n("Div", ["h", "sqrt2"], ["d"], name="/act/Div"),
        n("Erf", ["d"], ["e"], name="/act/Erf"), n("Add", ["e", "one"], ["a"], name="/act/Add"),
        n("Mul", ["h", "a"], ["m"], name="/act/Mul"), n("Mul", ["m", "half"], ["y"], name="/act/Mul_1"),
    ]
    gm = assert_matches_ort(onnx_model(nodes, inits, 17, shape=("N", 4, 2, 2)), shape=(4, 2, 2))
    assert [(n.meta["layer"], n.target._opname) for n in gm.graph.nodes if n.op == "call_function"] == [
        ("reshape", "reshape"), ("fc1", "linear"), ("act", "gelu")]
    assert gm.get_parameter("fc1.weight").shape == (12, 16)


def test_unsupported_onnx_op_is_named_with_node_and_opset(tmp_path):
    n = helper.make_node
    nodes = [n("Relu", ["x"], ["r"], name="relu_0"),
             n("NonMaxSuppression", ["r", "r"], ["y"], name="nms_1")]
    model = onnx_model(nodes, {}, 17)
    message = r"ONNX op 'NonMaxSuppression' \(node 'nms_1', opset 17\) is not supported by xai's ONNX→torch converter; supported: .*Conv"
    with pytest.raises(UsageError, match=message):
        from_onnx(model)
    path = tmp_path / "nms.onnx"
    onnx.save(model, str(path))
    spec = InputSpec(size=(8, 8), channels=4, mean=(0.0,) * 4, std=(1.0,) * 4)
    forward_only = Model("nms", spec, CPU, forward_fn=lambda x: x, source=str(path), graph_source=GraphSource("onnx", path=path))
    with pytest.raises(UsageError, match=message):
        check_needs(forward_only, "gradient", "saliency")


class Tokens(nn.Module):
    """Batch-dependent reshapes and a class token expanded to the batch, as in ViTs."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.token = nn.Parameter(torch.randn(1, 1, 8))
        self.head = nn.Linear(8 * 5, 3)

    def forward(self, x):
        t = self.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.token.expand(x.shape[0], -1, -1), t], 1)
        return self.head(t.reshape(x.shape[0], -1))


def test_onnx_exported_with_a_fixed_batch_keeps_the_batch_dynamic(tmp_path):
    torch.manual_seed(0)
    module = Tokens().eval()
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(module, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17)
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    gm = from_onnx(path)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert rel_err(gm(x), module(x)) <= 1e-5
