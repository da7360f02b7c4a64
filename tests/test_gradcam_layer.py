"""Grad-CAM's layer: the default is a spatial feature map in the model's own layout (nchw, nhwc or a
vision transformer's token grid) on timm convnext, poolformer, vit, deit, levit and swin (random
init, reduced configs); token/NHWC captures match hand-made hooks; a trained CNN's maps win the
pointing game against random maps; run.json and `xai plugins show` name the layer."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

import xaicli
from xaicli.cli import app
from xaicli.descriptors import MetricContext
from xaicli.errors import UsageError
from xaicli.model import InputSpec, Model
from xaicli.rng import BatchRNG
from xaicli_plugins.methods.gradcam import check, gradcam, gradcam_plus_plus, resolve_layer
from xaicli_plugins.metrics.localisation import pointing_game


def _poolformer() -> torch.nn.Module:
    """poolformer_s12's recipe with one block per stage (timm's factory fixes `depths`)."""
    from timm.models.metaformer import GroupNorm1, MetaFormer

    return MetaFormer(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), downsample_norm=None, mlp_act=torch.nn.GELU,
                      norm_layers=GroupNorm1, layer_scale_init_values=1e-5, res_scale_init_values=None,
                      use_mlp_head=False, num_classes=4)


# name -> (factory, input size, expected role, grid, extra tokens, expected layer)
ARCHITECTURES = {
    "convnext": (lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=4, depths=(1, 1, 1, 1)),
                 64, "nchw", (2, 2), 0, "stages.3.blocks.0.add"),
    "poolformer": (_poolformer, 64, "nchw", (2, 2), 0, "stages.3.blocks.0.add_1"),
    "vit": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4, img_size=32,
                                      patch_size=8, depth=2), 32, "tokens", (4, 4), 1, "blocks.1.norm1"),
    "deit": (lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=4,
                                       img_size=32, patch_size=8, depth=2), 32, "tokens", (4, 4), 2, "blocks.1.norm1"),
    "levit": (lambda: timm.create_model("levit_128s", pretrained=False, num_classes=4, img_size=96, depth=(1, 1, 1)),
              96, "tokens", (2, 2), 0, "stages.2.blocks.0.add_1"),
    "swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=4, img_size=64,
                                       window_size=4, depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8)),
             64, "nhwc", (2, 2), 0, "norm"),
}


@functools.lru_cache(maxsize=None)  # one build (and graph) per architecture for the whole file
def timm_model(name: str) -> tuple[torch.nn.Module, Model, torch.Tensor]:
    factory, size = ARCHITECTURES[name][:2]
    torch.manual_seed(0)
    module = factory().eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    return module, Model(name, InputSpec(size=(size, size)), torch.device("cpu"), module=module), x


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_default_layer_is_a_spatial_map_in_the_models_layout(name):
    _, model, x = timm_model(name)
    role, grid, extra, layer = ARCHITECTURES[name][2:]
    chosen = resolve_layer(model, None)
    assert (chosen.role, chosen.grid, chosen.extra) == (role, grid, extra), chosen.describe()
    assert chosen.layer == layer, chosen.describe()
    assert check(model, {"layer": None}) == {"layer": layer, "layer_role": role, "layer_grid": list(grid),
                                             "layer_extra_tokens": extra}
    with torch.no_grad():
        top = model.module(x).argmax(1)  # the predicted class: its evidence is positive somewhere
    result = gradcam(model, x, top, BatchRNG([0, 1]))
    assert result.extras["cam"].shape == (2, *grid)
    assert result.extras["cam"].abs().max() > 0, "the maps are constant zero"
    assert result.relevance.shape == x.shape and torch.isfinite(result.relevance).all()


@pytest.fixture(scope="module")
def vit():
    return timm_model("vit")


def test_token_grid_matches_a_hooked_reshape(vit):
    """The tokens view equals Grad-CAM on the hooked module output with the class token dropped and
    the patch tokens reshaped (pytorch-grad-cam's reshape_transform for ViTs), for both weightings."""
    module, model, x = vit
    t = torch.tensor([2, 3])
    saved = []
    handle = module.blocks[1].norm1.register_forward_hook(lambda m, i, o: saved.append(o))
    score = module(x).gather(1, t[:, None]).sum()
    handle.remove()
    (g,) = torch.autograd.grad(score, saved[0])
    grid = lambda v: v[:, 1:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)  # noqa: E731
    a, g = grid(saved[0].detach()), grid(g)
    ref = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1))
    ours = gradcam(model, x, t, BatchRNG([0, 1]))
    assert torch.allclose(ours.extras["cam"], ref, rtol=1e-4, atol=1e-6 * ref.abs().max())
    alpha = g**2 / (2 * g**2 + a.sum((2, 3), keepdim=True) * g**3)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    ref_pp = F.relu(((alpha * F.relu(g)).sum((2, 3), keepdim=True) * a).sum(1))
    ours_pp = gradcam_plus_plus(model, x, t, BatchRNG([0, 1]))
    assert ours_pp.extras["cam"].abs().max() > 0
    assert torch.allclose(ours_pp.extras["cam"], ref_pp, rtol=1e-4, atol=1e-5 * ref_pp.abs().max())


def test_named_token_layer_and_non_map_layer(vit):
    _, model, x = vit
    named = resolve_layer(model, "blocks.0")  # the block's output: a token grid
    assert (named.layer, named.role, named.grid, named.extra) == ("blocks.0.add_1", "tokens", (4, 4), 1)
    cam = gradcam_plus_plus(model, x, torch.tensor([0, 1]), BatchRNG([0, 1]), layer="blocks.0").extras["cam"]
    assert cam.shape == (2, 4, 4) and cam.abs().max() > 0
    with pytest.raises(UsageError, match=r"layer 'head' has output shape \[B, 4\].*blocks\.1\.norm1 \(tokens.*\d+ more"):
        check(model, {"layer": "head"})


def test_attention_matrices_and_qkv_are_never_candidates(vit):
    from xaicli.graph.feature_maps import survey

    _, model, _ = vit
    maps = survey(model.graph(), (3, 32, 32)).maps
    layers = [m.layer for m in maps]
    assert "blocks.1.norm1" in layers and "blocks.1.add_1" in layers
    assert not [m for m in layers if "softmax" in m or "matmul" in m or "qkv" in m or "attn.reshape" in m]
    assert not [m for m in maps if m.layer in ("norm", "blocks.1.add_1") and m.reaches]  # class token only


def test_named_nhwc_layer_on_swin():
    module, model, x = timm_model("swin")
    named = resolve_layer(model, "layers.2")
    assert (named.role, named.grid) == ("nhwc", (4, 4))
    saved = []
    handle = module.layers[2].register_forward_hook(lambda m, i, o: saved.append(o))
    score = module(x)[:, 0].sum()
    handle.remove()
    (g,) = torch.autograd.grad(score, saved[0])
    a, g = saved[0].detach().permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
    ref = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1))
    ours = gradcam(model, x, torch.tensor([0, 0]), BatchRNG([0, 1]), layer="layers.2").extras["cam"]
    assert ref.abs().max() > 0 and torch.allclose(ours, ref, rtol=1e-4, atol=1e-5 * ref.abs().max())


def test_a_model_without_a_spatial_map_fails_up_front_listing_candidates():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.AdaptiveAvgPool2d(1),
                                 torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()
    model = Model("pooled", InputSpec(size=(8, 8)), torch.device("cpu"), module=module)  # the conv's map is 1×1
    with pytest.raises(UsageError, match="no layer of the model is a spatial feature map.*none found"):
        check(model, {})
    flat = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 16 * 16, 2)).eval()
    with torch.no_grad():
        flat[3].weight[:, : 4 * 16 * 16 // 2] = 0  # top half of the map only
    model = Model("flat", InputSpec(size=(16, 16)), torch.device("cpu"), module=flat)
    assert resolve_layer(model, None).layer == "1"  # the ReLU's map, reached through the linear layer


def test_a_model_whose_output_is_constant_takes_its_last_map():
    """timm initialises the heads of MLP-Mixer and ResMLP to zero: the output's gradient reaches no map,
    yet every map is as good as another; the run goes on (with zero maps) instead of failing."""
    torch.manual_seed(0)
    module = timm.models.mlp_mixer.MlpMixer(img_size=32, patch_size=8, num_blocks=1, embed_dim=16,
                                            num_classes=3).eval()
    assert not module.head.weight.any()
    model = Model("mixer", InputSpec(size=(32, 32)), torch.device("cpu"), module=module)
    chosen = resolve_layer(model, None)
    assert chosen.role == "tokens" and chosen.grid == (4, 4) and not chosen.reaches
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert not gradcam(model, x, torch.tensor([0, 1]), BatchRNG([0, 1])).relevance.any()


# --- a trained CNN localises its object ------------------------------------------------------------
SIZE, OBJECT, CLASSES = 32, 8, 3


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grey noise with one square of the class's colour (red, green, blue) at a random place:
    (images [n,3,32,32] in [0,1], labels [n], masks [n,1,32,32])."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 + 0.15 * torch.randn(n, 1, SIZE, SIZE, generator=g).expand(n, 3, SIZE, SIZE).clone()
    y = torch.randint(0, CLASSES, (n,), generator=g)
    corners = torch.randint(0, SIZE - OBJECT + 1, (n, 2), generator=g)
    masks = torch.zeros(n, 1, SIZE, SIZE, dtype=torch.bool)
    for i, (r, c) in enumerate(corners.tolist()):
        x[i, :, r:r + OBJECT, c:c + OBJECT] = 0.1
        x[i, y[i], r:r + OBJECT, c:c + OBJECT] = 1.0
        masks[i, :, r:r + OBJECT, c:c + OBJECT] = True
    return x.clamp(0, 1), y, masks


def cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, CLASSES))


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, float]:
    """The CNN trained for 80 steps of 32 images (~1 s) on the synthetic task; (module, held-out accuracy)."""
    torch.manual_seed(0)
    module = cnn()
    optimiser = torch.optim.Adam(module.parameters(), lr=1e-2)
    x, y, _ = synthetic(1024, seed=0)
    g = torch.Generator().manual_seed(1)
    for _ in range(80):
        batch = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(module((x[batch] - 0.5) / 0.25), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    module.eval()
    xt, yt, _ = synthetic(200, seed=2)
    with torch.no_grad():
        accuracy = (module((xt - 0.5) / 0.25).argmax(1) == yt).float().mean().item()
    return module, accuracy


def test_trained_cnn_gradcam_beats_a_random_map_at_the_pointing_game(trained):
    module, accuracy = trained
    assert accuracy >= 0.95
    model = Model("shapes", InputSpec(size=(SIZE, SIZE), mean=(0.5,) * 3, std=(0.25,) * 3), torch.device("cpu"),
                  module=module)
    x, y, masks = synthetic(64, seed=3)
    x = (x - 0.5) / 0.25
    rng = BatchRNG(range(64))
    ctx = MetricContext(explain=None, masks=masks, rng=rng)
    cam = gradcam(model, x, y, rng).relevance
    random_map = torch.rand(x.shape, generator=torch.Generator().manual_seed(4))
    ours = pointing_game(model, x, y, cam, ctx).mean().item()
    chance = pointing_game(model, x, y, random_map, ctx).mean().item()
    assert resolve_layer(model, None).layer == "5"  # the last ReLU, 8×8
    assert ours >= 0.9 and chance <= 0.2, (ours, chance)


def test_run_json_and_plugins_show_name_the_layer(trained, tmp_path):
    module, _ = trained
    images = tmp_path / "images"
    images.mkdir()
    x, _, _ = synthetic(2, seed=5)
    for i, image in enumerate(x):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(images / f"img{i}.png")
    result = xaicli.explain(module, images, methods=["gradcam", "gradcam_plus_plus"], output=tmp_path / "out",
                            preprocess={"size": SIZE, "mean": [0.5] * 3, "std": [0.25] * 3}, device="cpu")
    assert result.exit_code == 0, result.errors
    run = json.loads(Path(tmp_path / "out" / "run.json").read_text())
    expected = {"layer": "5", "layer_role": "nchw", "layer_grid": [8, 8], "layer_extra_tokens": 0}
    assert run["resolved"] == {"gradcam": expected, "gradcam_plus_plus": expected}
    shown = CliRunner().invoke(app, ["plugins", "show", "gradcam"], env={"COLUMNS": "400"})
    assert shown.exit_code == 0 and "token grid" in shown.output and "never a pooled tensor" in shown.output
