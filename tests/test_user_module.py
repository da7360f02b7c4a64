"""The user's own nn.Module in the Python API (`xaicli.explain(module, ...)`): explained, and never
changed — parameters, buffers, hooks, requires_grad flags and training mode stay as they were."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision.models import resnet18

import xaicli
from xaicli.errors import UsageError
from xaicli.model import DEFAULT_SPEC, InputSpec, model_from_module, state_digest
from xaicli_plugins.loaders import timm as timm_loader

CPU = torch.device("cpu")
METHODS = ["lrp", "gradcam", "saliency"]


def net() -> torch.nn.Module:
    """torchvision resnet18, random init (seeded), with BatchNorm statistics that are not the
    defaults, so that any update of them shows."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = resnet18(weights=None, num_classes=10)
        with torch.no_grad():
            for bn in (m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)):
                bn.running_mean.normal_(0.0, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
                bn.num_batches_tracked.fill_(7)
    return module


def set_mode(module: torch.nn.Module, mode: str) -> None:
    """train, eval, or mixed: training blocks beside evaluating ones, some weights frozen, a user hook."""
    module.train(mode != "eval")
    if mode == "mixed":
        module.layer2.eval()
        module.fc.eval()
        module.conv1.weight.requires_grad_(False)
        module.layer3[0].bn1.requires_grad_(False)
        module.layer1.register_forward_hook(lambda mod, args, out: None)


def snapshot(module: torch.nn.Module) -> dict:
    """Everything of the module the run must leave as it was."""
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "params": [(name, id(p), p.requires_grad) for name, p in module.named_parameters()],
        "buffers": [(name, id(b)) for name, b in module.named_buffers()],
        "training": [(name, m.training) for name, m in module.named_modules()],
        "hooks": [(name, [list(getattr(m, kind)) for kind in
                          ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")])
                  for name, m in module.named_modules()],
    }


def assert_unchanged(module: torch.nn.Module, before: dict) -> None:
    after = snapshot(module)
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k, v in before["state"].items()
               if not (after["state"][k].dtype == v.dtype and torch.equal(after["state"][k], v))]
    assert changed == []
    for key in ("params", "buffers", "training", "hooks"):
        assert after[key] == before[key], key
    assert all(p.grad is None for p in module.parameters())


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_explain_never_changes_the_users_module(images, tmp_path, mode):
    module = net()
    set_mode(module, mode)
    before = snapshot(module)
    result = xaicli.explain(module, images, methods=METHODS, output=tmp_path, preprocess={"size": 64},
                            device="cpu", batch_size=2)
    assert result.exit_code == 0 and result.errors == []
    assert result.manifest["counts"]["done"] == 3
    assert result.manifest["model"]["digest"] == state_digest(module)
    for method in METHODS:
        assert sorted(p.name for p in (tmp_path / "arrays" / method).glob("*.npz")) == ["img0.npz", "img1.npz", "img2.npz"]
        assert len(list((tmp_path / "heatmaps" / method).glob("*.png"))) == 3
    assert_unchanged(module, before)


def test_a_rerun_with_the_same_weights_resumes(images, tmp_path):
    module = net().eval()
    xaicli.explain(module, images, methods=["saliency"], output=tmp_path, preprocess={"size": 64}, device="cpu")
    again = xaicli.explain(net().train(), images, methods=["saliency"], output=tmp_path, preprocess={"size": 64}, device="cpu")
    assert again.manifest["counts"] == {"done": 0, "skipped": 3, "failed": 0}


def test_the_model_is_an_eval_copy_with_its_own_digest():
    module = net().train()
    model = model_from_module(module, CPU)
    assert model.module is not module and not any(m.training for m in model.module.modules())
    assert all(a is not b for a, b in zip(model.module.parameters(), module.parameters()))
    assert model.source == "python:ResNet" and model.spec == DEFAULT_SPEC
    assert model.digest == state_digest(module) == model_from_module(net().eval(), CPU).digest
    with torch.no_grad():
        module.fc.bias[0] += 1e-6
    assert state_digest(module) != model.digest
    spec = InputSpec(size=(64, 64))
    assert model_from_module(module, CPU, spec=spec, labels=["a"] * 10).spec == spec


def test_a_timm_model_object_brings_its_input_spec():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = timm.create_model("resnet18", pretrained=False, num_classes=5)
    model = model_from_module(module, CPU)
    assert model.spec == timm_loader.input_spec(module)
    assert (model.spec.size, model.spec.crop_pct) == (tuple(module.pretrained_cfg["input_size"][1:]), module.pretrained_cfg["crop_pct"])
    assert model.source == "python:ResNet"


def test_a_module_that_cannot_be_copied_is_refused_with_the_reason():
    module = torch.nn.Linear(4, 2)
    module.lock = threading.Lock()
    with pytest.raises(UsageError, match=r"model Linear: xai explains a copy .* cannot be copied: .*lock"):
        model_from_module(module, CPU)
