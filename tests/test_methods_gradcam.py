"""gradcam against captum's LayerGradCam + LayerAttribution.interpolate (≤ 1e-5), Grad-CAM++ by hand."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import LayerAttribution, LayerGradCam

from xaicli.errors import UsageError
from xaicli.model import InputSpec, Model
from xaicli.rng import BatchRNG
from xaicli_plugins.methods.gradcam import gradcam, gradcam_plus_plus


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture
def model(digits) -> Model:
    return Model("digits", digits.spec, torch.device("cpu"), module=digits.module)


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_default_layer_matches_captum_on_trained_cnn(model, digits, interpolation):
    x, t = digits.x[:6], digits.y[:6]
    ours = gradcam(model, x, t, BatchRNG(range(6)), interpolation=interpolation, max_batch=4)
    cam = LayerGradCam(digits.module, digits.module[10]).attribute(x, target=t, relu_attributions=True)
    ref = LayerAttribution.interpolate(cam, (32, 32), interpolate_mode=interpolation)
    assert cam.shape == (6, 1, 8, 8) and ref.abs().max() > 0
    assert relative_error(ours.relevance, ref) <= 1e-5
    assert torch.allclose(ours.extras["cam"], cam[:, 0], atol=1e-6)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    return module, Model("resnet18", InputSpec(size=(64, 64)), torch.device("cpu"), module=module)


def test_module_path_and_default_match_captum_on_resnet(resnet):
    module, model = resnet
    x, t = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 3, 9])
    for layer, ref_layer in ((None, module.layer4), ("layer3", module.layer3)):
        ours = gradcam(model, x, t, BatchRNG(range(3)), layer=layer)
        cam = LayerGradCam(module, ref_layer).attribute(x, target=t, relu_attributions=True)
        ref = LayerAttribution.interpolate(cam, (64, 64), interpolate_mode="bilinear")
        assert relative_error(ours.relevance, ref.expand(3, 3, 64, 64)) <= 1e-5, layer


def test_gradcam_plus_plus_matches_the_closed_form(model, digits):
    x, t = digits.x[:4], digits.y[:4]
    acts = []
    handle = digits.module[10].register_forward_hook(lambda m, i, o: acts.append(o))
    score = digits.module(x).gather(1, t[:, None]).sum()
    handle.remove()
    (g,) = torch.autograd.grad(score, acts[0])
    a = acts[0].detach()
    alpha = g**2 / (2 * g**2 + a.sum((2, 3), keepdim=True) * g**3)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    cam = F.relu(((alpha * F.relu(g)).sum((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    ours = gradcam_plus_plus(model, x, t, BatchRNG(range(4)))
    assert relative_error(ours.extras["cam"], cam[:, 0]) <= 1e-5


def test_layer_by_name_and_unknown_layer(model, digits):
    x, t = digits.x[:2], digits.y[:2]
    by_layer = gradcam(model, x, t, BatchRNG([0, 1]), layer="4")  # Sequential index 4: the second conv
    by_node = gradcam(model, x, t, BatchRNG([0, 1]), layer="_4")
    cam = LayerGradCam(digits.module, digits.module[4]).attribute(x, target=t, relu_attributions=True)
    assert by_layer.extras["cam"].shape == (2, 16, 16)
    assert torch.equal(by_layer.relevance, by_node.relevance)
    assert torch.allclose(by_layer.extras["cam"], cam[:, 0], atol=1e-6)
    with pytest.raises(UsageError, match="no layer 'layer9'"):
        gradcam(model, x, t, BatchRNG([0, 1]), layer="layer9")


def test_torchscript_and_onnx_models_give_the_eager_maps(model, digits):
    """No module hooks: the same graph-based computation serves every format."""
    from xaicli.registry import default_registry

    x, t = digits.x[:4], digits.y[:4]
    eager = gradcam(model, x, t, BatchRNG(range(4))).relevance
    for path in (digits.torchscript, digits.onnx):
        other = default_registry().loader_for(str(path)).load(str(path), torch.device("cpu"))
        assert relative_error(gradcam(other, x, t, BatchRNG(range(4))).relevance, eager) <= 1e-4, path
