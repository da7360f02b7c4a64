"""One torch graph for every model format: eager/timm, TorchScript and ONNX.

Graph-aware methods (LRP, Grad-CAM, gradients through ONNX models) work on this graph only::

    gm = model.graph()                      # = to_graph(model.graph_source, ...), cached on the Model
    gm = from_module(module, example)       # eager / timm, through torch.export
    gm = from_torchscript(script, example)  # TorchScript, through torch's TS2EPConverter
    gm = from_onnx("model.onnx")            # our own ONNX->torch converter (opsets 13-21)

The representation (the contract with xaicli.lrp and every graph-aware method)
-------------------------------------------------------------------------------
A `torch.fx.GraphModule`:
- exactly one placeholder, `x` [B, C, H, W], and one output, the logits [B, K];
- the batch dimension is dynamic: one graph serves every batch size (reshapes use -1 for the
  batch; where a size must be spelled out, e.g. expanding a class token, it is computed by
  `aten.sym_size.int` and Python int arithmetic — the only nodes that are not tensor ops).
  Other dimensions are fixed to the example's. The one exception: a model that pins its batch
  to a number gets a graph of the example's batch, marked on its input (`batch.fixed_batch`);
  consumers run every graph through `batch.in_rows`, which pads and cuts such a graph's chunks;
- every tensor op is a `call_function` node whose target is a `torch.ops.aten` OpOverload,
  functional (no in-place ops), in evaluation mode (dropout removed);
- parameters and constants are `get_attr` nodes naming real nn.Parameters (requires_grad off)
  and buffers of the GraphModule, under the model's own names (`layer1.0.conv1.weight`); they
  are copies: the graph and the user's model never share mutable state;
- node metadata: `meta["layer"]` (the layer name, see below), `meta["val"]` (a fake tensor
  with the output shape; absent on nodes created by normalisation).

The op vocabulary is normalised so that one model gives the same kinds of nodes from every
source (where the exporters allow):
- convolution `aten.conv2d.default` (conv1d/conv3d likewise; transposed:
  `aten.conv_transpose2d.input`); linear layers `aten.linear.default` (ONNX Gemm and
  MatMul+Add with constant weights included); other products `aten.matmul.default`;
- batch norm `aten.batch_norm.default` with running statistics and training=False (one
  output; never `_native_batch_norm_legit_no_training`); layer norm `aten.layer_norm.default`;
- pooling `aten.max_pool2d.default`, `aten.avg_pool2d.default`,
  `aten.adaptive_avg_pool2d.default` (global average pooling too: ONNX GlobalAveragePool and
  keep-dim means over H, W become `adaptive_avg_pool2d(x, [1, 1])`), other means `aten.mean.dim`;
- residual sums `aten.add.Tensor`, concatenation `aten.cat.default`;
- activations `aten.relu/gelu/sigmoid/tanh/hardswish/hardsigmoid/silu/leaky_relu/...`
  (ONNX's erf spelling of GELU becomes `aten.gelu.default`, x·sigmoid(x) `aten.silu.default`,
  Clip(min, max) `aten.hardtanh.default` like nn.ReLU6);
- attention is explicit: `matmul`, `mul` (scale), `softmax.int`, `matmul`
  (scaled_dot_product_attention is expanded);
- shape ops: `aten.reshape.default` (never view or flatten), `aten.permute.default` (never
  transpose), `aten.select.int` / `aten.slice.Tensor` (never unbind/split + getitem),
  `aten.expand.default`; the only `operator.getitem` nodes would follow a multi-output op
  with no single-output spelling (none of the supported models has one).

Known differences between sources: torch.onnx folds BatchNorm into the preceding
convolution (so ONNX graphs have fewer batch_norm nodes, and input gradients equal those of
the folded model), and the dynamo exporter spells a few ops its own way (an adaptive pool as
gathers, an as_strided as index arithmetic); the values agree.

Layer names (`meta["layer"]`; `node.name` is the same with dots as underscores)
--------------------------------------------------------------------------------
Built from the node's scope: the innermost module path (eager/timm), the owner of the
parameters it reads (TorchScript keeps no module structure: other ops take the block of their
input), the module path the exporter recorded (ONNX from torch.onnx, both exporters), else the
ONNX node name. A leaf scope with one op is named by the scope (`layer4.1.conv2`); otherwise
scope + op (`layer4.1.add`, `blocks.0.attn.softmax`, top level `linear`), repeats get `_1`,
`_2`. `find_node(gm, "layer4")` resolves a user's name: an exact layer or node name, else the
last node inside that module (its output).
"""
from .convert import to_graph
from .naming import find_node, layer_names
from .onnx_convert import from_onnx
from .trace import from_module, from_torchscript

__all__ = ["find_node", "from_module", "from_onnx", "from_torchscript", "layer_names", "to_graph"]
