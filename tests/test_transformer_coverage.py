"""Coverage of vision transformers and hybrids (timm, random init, tiny configs) in three formats:
eager (the module), TorchScript (jit.trace, saved and loaded by the torchscript loader) and ONNX
(torch.onnx's TorchScript-based exporter, opset 17, loaded by the onnx loader). For each pair:
`Model.graph()` builds, its logits match the module's within 1e-4 at a batch size other than
the traced one, and lrp, gradcam and integrated_gradients give finite attributions of the
input's shape. One family also runs end to end through `xaicli.explain` in every format.

Left out (bench/survey_transformers.py surveys them): swin, swinv2 and maxvit (export takes
minutes on 2 cores), xcit (Grad-CAM's default layer receives no gradient), eva's ONNX file
(torch.onnx's TorchScript exporter fails on its attention), mobilevit's and twins' TorchScript
(torch's TS2EPConverter fails on traced sizes). Every family runs in `make test`."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest
import timm
import torch
from timm.models import metaformer as mf

import xaicli
from xaicli.model import InputSpec, Model, model_from_module
from xaicli.registry import default_registry
from xaicli.rng import BatchRNG

TOLERANCE = 1e-4
FORMATS = ("eager", "torchscript", "onnx")
METHODS = {"lrp": {}, "gradcam": {}, "integrated_gradients": {"steps": 4}}


def _metaformer(**kw: Any) -> Callable[[], torch.nn.Module]:
    return lambda: mf.MetaFormer(num_classes=10, depths=(1, 1, 1, 1), dims=(16, 16, 32, 32), **kw)


FAMILIES: dict[str, tuple[str | Callable[[], torch.nn.Module], int, dict[str, Any]]] = {
    "vit": ("vit_tiny_patch16_224", 32, dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)),
    "deit": ("deit_tiny_distilled_patch16_224", 32, dict(img_size=32, patch_size=8, depth=1, embed_dim=32,
                                                         num_heads=2)),
    "beit": ("beit_base_patch16_224", 32, dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)),
    "cait": ("cait_xxs24_224", 32, dict(img_size=32, patch_size=8, depth=1, depth_token_only=1, embed_dim=32,
                                        num_heads=2)),
    "eva": ("eva02_tiny_patch14_224", 28, dict(img_size=28, depth=1, embed_dim=32, num_heads=2)),
    "levit": ("levit_128s", 32, dict(img_size=32)),
    "pit": ("pit_ti_224", 32, dict(img_size=32)),
    "mobilevit": ("mobilevit_xxs", 32, {}),
    "efficientvit_b0": ("efficientvit_b0", 32, {}),
    "efficientvit_m0": ("efficientvit_m0", 64, dict(img_size=64)),
    "coat": ("coat_lite_tiny", 32, dict(img_size=32)),
    "twins": ("twins_svt_small", 32, dict(img_size=32, depths=(1, 1, 1, 1))),
    "convnext": ("convnext_atto", 32, dict(depths=(1, 1, 1, 1), dims=(16, 16, 32, 32))),
    "caformer": (_metaformer(token_mixers=[mf.SepConv, mf.SepConv, mf.Attention, mf.Attention],
                             norm_layers=[mf.LayerNorm2dNoBias] * 2 + [mf.LayerNormNoBias] * 2), 64, {}),
    "convformer": (_metaformer(token_mixers=mf.SepConv), 64, {}),
    "poolformer": (_metaformer(downsample_norm=None, mlp_act=torch.nn.GELU, mlp_bias=True,
                               norm_layers=mf.GroupNorm1, res_scale_init_values=None, use_mlp_head=False), 64, {}),
}


NOT_COVERED = {("eva", "onnx"), ("mobilevit", "torchscript"), ("twins", "torchscript")}  # see the module docstring
PAIRS = [pytest.param(f, fmt, id=f"{f}-{fmt}") for f in FAMILIES for fmt in FORMATS if (f, fmt) not in NOT_COVERED]


def build(family: str) -> tuple[torch.nn.Module, int]:
    make, size, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    module = make() if callable(make) else timm.create_model(make, pretrained=False, num_classes=10, **kwargs)
    return module.eval(), size


def save(module: torch.nn.Module, fmt: str, size: int, folder: Path) -> Path:
    """`module` as a TorchScript or ONNX file carrying its input spec (xai.json)."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    spec = json.dumps({"size": size, "crop_pct": 1.0})
    if fmt == "torchscript":
        path = folder / "model.pt"
        torch.jit.save(torch.jit.trace(module, x, check_trace=False), str(path), _extra_files={"xai.json": spec})
        return path
    buffer = io.BytesIO()
    torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=17, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, {"xai.json": spec})
    path = folder / "model.onnx"
    onnx.save(proto, str(path))
    return path


class Pair:
    """One family in one format: the source module, the loaded Model and its graph."""

    def __init__(self, family: str, fmt: str, folder: Path):
        self.module, self.size = build(family)
        if fmt == "eager":
            self.model = model_from_module(self.module, torch.device("cpu"), spec=InputSpec(size=(self.size,) * 2))
            self.path: Path | None = None
        else:
            self.path = save(self.module, fmt, self.size, folder)
            self.model = default_registry().loader_for(str(self.path)).load(str(self.path), torch.device("cpu"))
        self.graph = self.model.graph()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Callable[[str, str], Pair]:
    """Pairs built on first use and kept for the module (each test of a pair reuses its graph)."""
    cache: dict[tuple[str, str], Pair] = {}

    def get(family: str, fmt: str) -> Pair:
        if (family, fmt) not in cache:
            cache.clear()  # one pair at a time: the tests of a pair run together
            cache[family, fmt] = Pair(family, fmt, tmp_path_factory.mktemp(f"{family}_{fmt}"))
        return cache[family, fmt]

    return get


def batch(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("family,fmt", PAIRS)
def test_graph_matches_and_methods_run(pairs, family, fmt):
    pair = pairs(family, fmt)
    x = batch(pair.size)
    with torch.no_grad():
        want, got = pair.module(x), pair.graph(x)
    assert got.shape == want.shape == (3, 10)
    error = ((got - want).abs().max() / want.abs().max()).item()
    assert error <= TOLERANCE, f"{family}/{fmt}: graph vs model relative error {error:.2g}"
    target = want.argmax(1)
    registry = default_registry()
    for name, overrides in METHODS.items():
        method = registry.method(name)
        params = {p.name: p.default for p in method.params} | overrides
        if method.check is not None:
            method.check(pair.model, params)
        out = method.explain(pair.model, x[:2], target[:2], BatchRNG([1, 2]), **params).relevance
        assert out.shape[0] == 2 and out.shape[-2:] == x.shape[-2:], f"{family}/{fmt}/{name}: shape {tuple(out.shape)}"
        assert torch.isfinite(out).all() and out.abs().sum() > 0, f"{family}/{fmt}/{name}: not finite or all zero"


@pytest.mark.parametrize("fmt", FORMATS)
def test_explain_end_to_end(tmp_path, fmt):
    """The CLI's path (xaicli.explain) exits 0 with the three methods on a tiny ViT."""
    from PIL import Image

    module, size = build("vit")
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(image)
    target = module if fmt == "eager" else str(save(module, fmt, size, tmp_path))
    extra = {"preprocess": {"size": size, "crop_pct": 1.0}} if fmt == "eager" else {}
    result = xaicli.explain(target, [str(image)], methods=list(METHODS), output=str(tmp_path / "out"), **extra)
    assert result.exit_code == 0, result.errors


class AutocastOff(torch.nn.Module):
    """A block run with autocast disabled, as efficientvit's linear attention is written."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = h.float() / (h.abs().sum(dim=1, keepdim=True) + 1.0)
        return self.fc(h.mean((2, 3)))


def test_autocast_blocks_are_inlined():
    from xaicli.graph import from_module

    torch.manual_seed(0)
    module = AutocastOff().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = from_module(module, x)
    assert not any(n.op == "get_attr" and isinstance(getattr(gm, n.target, None), torch.fx.GraphModule)
                   for n in gm.graph.nodes)
    y = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(gm(y), module(y), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("start,end,step", [(-1, -2**63, -1), (3, 0, -1), (4, -9, -2), (2**62, 1, -3)])
def test_negative_step_slice_matches_numpy(start, end, step):
    from xaicli.graph.onnx_ops import OPS, Attrs

    data = np.arange(30).reshape(5, 6)
    got = OPS["Slice"](Attrs(), torch.from_numpy(data), [start], [end], [1], [step])
    assert got.tolist() == data[:, start:end:step].tolist()
    static = OPS["Slice"](Attrs(), data, [start], [end], [0], [step])  # shape arithmetic (numpy)
    assert np.asarray(static).tolist() == data[start:end:step].tolist()


@pytest.mark.parametrize("mode,coords,scales,sizes,want", [
    ("linear", "pytorch_half_pixel", None, [1, 2, 7, 9], dict(size=[7, 9], mode="bilinear", align_corners=False)),
    ("linear", "align_corners", None, [1, 2, 7, 9], dict(size=[7, 9], mode="bilinear", align_corners=True)),
    ("nearest", "asymmetric", torch.tensor([1.0, 1.0, 2.0, 2.0]), None, dict(scale_factor=2.0, mode="nearest")),
    ("cubic", "half_pixel", torch.tensor([1.0, 1.0, 1.5, 1.5]), None, dict(scale_factor=1.5, mode="bicubic",
                                                                            align_corners=False)),
])
def test_resize_matches_interpolate(mode, coords, scales, sizes, want):
    import torch.nn.functional as F
    from xaicli.graph.onnx_ops import OPS, Attrs

    x = torch.randn(1, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    attrs = Attrs(mode=mode, coordinate_transformation_mode=coords, nearest_mode="floor")
    got = OPS["Resize"](attrs, x, None, scales, sizes)
    torch.testing.assert_close(got, F.interpolate(x, **want))
