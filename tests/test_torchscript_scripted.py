"""Scripted TorchScript (torch.jit.script) transformers: torch's TS2EPConverter refuses them, so the
loader traces them through a wrapper first (xaicli.graph.trace). The graph must match the model at a
batch size other than the traced one, keep the model's own layer names, and run lrp, gradcam and
integrated gradients from the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from xaicli.graph.batch import fixed_batch
from xaicli.model import GraphUnavailable
from xaicli.registry import default_registry

TINY = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)),
    "twins": ("twins_svt_small", dict(img_size=32, depths=(1, 1, 1, 1))),
    # scripted size arithmetic (aten.mul.int on the batch) must not pin the batch
    "mobilevit": ("mobilevit_xxs", dict(img_size=32)),
    # timm's levit keeps attention biases in a per-device cache; torch's converter cannot follow it
    "levit": ("levit_128s", dict(img_size=32)),
}
LAYERS = {"vit": {"head", "blocks.0.attn.proj"}, "twins": {"head", "blocks.0.0.attn.proj"},  # named after modules
          "mobilevit": {"head.fc", "stages.2.1.transformer.0.attn.proj"}}


def scripted(family: str, folder: Path) -> tuple[torch.nn.Module, Path]:
    name, kwargs = TINY[family]
    torch.manual_seed(0)
    module = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    path = folder / f"{family}.pt"
    torch.jit.save(torch.jit.script(module), str(path), _extra_files={"xai.json": json.dumps({"size": 32,
                                                                                               "crop_pct": 1.0})})
    return module, path


@pytest.mark.parametrize("family", list(LAYERS))
def test_scripted_graph_matches_and_keeps_layer_names(tmp_path, family):
    module, path = scripted(family, tmp_path)
    model = default_registry().loader_for(str(path)).load(str(path), torch.device("cpu"))
    graph = model.graph()
    assert fixed_batch(graph) is None
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = module(x), graph(x)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4
    layers = {node.meta.get("layer") for node in graph.graph.nodes}
    assert LAYERS[family] <= layers, sorted(map(str, layers))
    assert not any(str(layer).startswith("scripted") for layer in layers), sorted(map(str, layers))


def test_scripted_vit_explained_from_the_cli(tmp_path):
    _, path = scripted("vit", tmp_path)
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(image)
    done = subprocess.run([sys.executable, "-m", "xaicli.cli", "explain", str(path), str(image), "-m", "lrp",
                           "-m", "gradcam", "-m", "integrated_gradients", "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["resolved"]["gradcam"]["layer"] == "blocks.0.norm1", run["resolved"]
    for method in ("lrp", "gradcam", "integrated_gradients"):
        assert (tmp_path / "out" / "arrays" / method / "photo.npz").is_file(), method


def test_a_scripted_model_the_converter_cannot_follow_fails_in_one_line_with_a_hint(tmp_path):
    _, path = scripted("levit", tmp_path)
    model = default_registry().loader_for(str(path)).load(str(path), torch.device("cpu"))
    with pytest.raises(GraphUnavailable) as failure:
        model.graph()
    message = str(failure.value)
    assert "\n" not in message and "aten::str" in message and "torch.jit.trace" in message, message
