"""Model loaders: TorchScript, ONNX and timm give the eager model's logits, carry their input
spec, and refuse bad files with a message naming the file."""
from __future__ import annotations

import hashlib
import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from xaicli.errors import UsageError
from xaicli.model import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from xaicli.registry import create_registry
from xaicli_plugins.loaders import onnx as onnx_loader
from xaicli_plugins.loaders import timm as timm_loader
from xaicli_plugins.loaders import torchscript

CPU = torch.device("cpu")
IMAGENET_DEFAULTS = InputSpec(size=(224, 224), channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875)


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def export_onnx(module: torch.nn.Module, example: tuple, path: Path, dynamic: bool = False) -> Path:
    names = [f"in{i}" for i in range(len(example))]
    axes = {name: {0: "batch"} for name in names} if dynamic else None
    torch.onnx.export(module, example, str(path), input_names=names, dynamic_axes=axes, opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="module")
def eager_logits(digits) -> torch.Tensor:
    with torch.no_grad():
        return digits.module(digits.x)


# --- TorchScript ---------------------------------------------------------------------------------

def test_traced_torchscript_matches_eager_and_reads_its_xai_json(digits, eager_logits):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # torch.jit.load's deprecation notice is not the user's business
        model = torchscript.load(str(digits.torchscript), CPU)
    assert (model(digits.x) - eager_logits).abs().max().item() <= 1e-5 * eager_logits.abs().max().item()
    assert model.spec == digits.spec
    assert model.labels == [str(d) for d in range(10)]
    assert model.digest == sha256(digits.torchscript)
    assert model.differentiable and model.name == "digits" and not model.module.training


def test_scripted_torchscript_without_xai_json_gets_imagenet_defaults(digits, eager_logits, tmp_path):
    path = tmp_path / "scripted.ts"
    torch.jit.save(torch.jit.script(digits.module), str(path))
    model = torchscript.load(str(path), CPU)
    assert (model(digits.x) - eager_logits).abs().max().item() <= 1e-5 * eager_logits.abs().max().item()
    assert model.spec == IMAGENET_DEFAULTS
    assert model.labels is None


@pytest.mark.parametrize(
    "content, cause",
    [
        ('{"size": 32', "not valid JSON"),
        ('{"size": 32, "means": [0.5]}', "unknown key(s) in its embedded xai.json: means"),
        ('{"channels": 3, "mean": [0.1, 0.2]}', "mean and std need 3 values"),
    ],
)
def test_bad_embedded_xai_json_is_reported_against_the_file(digits, tmp_path, content, cause):
    path = tmp_path / "bad_spec.pt"
    torch.jit.save(torch.jit.script(digits.module), str(path), _extra_files={"xai.json": content})
    with pytest.raises(UsageError, match="bad_spec.pt") as info:
        torchscript.load(str(path), CPU)
    assert cause in str(info.value)


def write_bad_models(digits, folder: Path) -> dict[str, tuple[Path, str]]:
    """Files that must be refused, each with the cause its message must state."""
    good = digits.torchscript.read_bytes()
    files = {
        "truncated.pt": (lambda p: p.write_bytes(good[: len(good) // 2]), "truncated"),
        "notes.pt": (lambda p: p.write_text("this is not a model\n"), "text file"),
        "lfs.pth": (lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\n"), "git lfs pull"),
        "eager.pt": (lambda p: torch.save(digits.module, p), "torch.jit.script"),
        "state.pth": (lambda p: torch.save(digits.module.state_dict(), p), "torch.jit.script"),
        "legacy.pt": (lambda p: torch.save(digits.module.state_dict(), p, _use_new_zipfile_serialization=False),
                      "legacy torch.save pickle"),
        "random.onnx": (lambda p: p.write_bytes(os.urandom(4096)), "not a valid ONNX model"),
        "truncated.onnx": (lambda p: p.write_bytes(digits.onnx.read_bytes()[:500]), "truncated"),
        "empty.onnx": (lambda p: p.write_bytes(b""), "empty"),
    }
    out = {}
    for name, (write, cause) in files.items():
        write(folder / name)
        out[name] = (folder / name, cause)
    return out


def test_bad_model_files_are_refused_with_the_file_and_cause(digits, tmp_path):
    registry = create_registry()
    for name, (path, cause) in write_bad_models(digits, tmp_path).items():
        loader = registry.loader_for(str(path))
        with pytest.raises(UsageError) as info:
            loader.load(str(path), CPU)
        message = str(info.value)
        assert str(path) in message and cause in message, (name, message)
    with pytest.raises(UsageError, match=r"missing\.onnx does not exist"):
        onnx_loader.load(str(tmp_path / "missing.onnx"), CPU)


# --- ONNX ----------------------------------------------------------------------------------------

def test_onnx_dynamic_batch_matches_eager_with_spec_from_metadata(digits, eager_logits):
    model = onnx_loader.load(str(digits.onnx), CPU)
    assert (model(digits.x) - eager_logits).abs().max().item() <= 1e-5 * eager_logits.abs().max().item()
    assert model.spec == digits.spec and model.labels == [str(d) for d in range(10)]
    assert model.fixed_batch is None
    assert model.differentiable  # gradients flow through xai's ONNX->torch graph (xaicli.graph)
    assert model.digest == sha256(digits.onnx)
    assert model.extra["providers"] == ["CPUExecutionProvider"]


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_fixed_batch_with_spec_from_input_shape(digits, eager_logits, tmp_path, batch):
    path = export_onnx(digits.module, (digits.x[:batch],), tmp_path / f"fixed{batch}.onnx")
    model = onnx_loader.load(str(path), CPU, threads=1)
    assert model.fixed_batch == batch and model.extra["threads"] == 1
    assert model.spec.size == (32, 32) and model.spec.channels == 1
    assert model.spec.mean == pytest.approx((sum(IMAGENET_MEAN) / 3,)) and model.spec.crop_pct == 0.875
    x = digits.x[:7]  # not a multiple of 3: the last chunk is padded and cut back
    logits = model.predict(x)
    assert logits.shape == (7, 10) and logits.dtype == torch.float32
    assert (logits - eager_logits[:7]).abs().max().item() <= 1e-5 * eager_logits.abs().max().item()


class TwoInputs(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class FromBytes(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean((2, 3))


def test_onnx_refuses_graphs_that_are_not_image_classifiers(tmp_path):
    image = torch.zeros(1, 3, 8, 8)
    cases = {
        "two": (TwoInputs(), (image, image), r"two\.onnx has 2 inputs \(in0, in1\)"),
        "flat": (torch.nn.Linear(4, 2), (torch.zeros(1, 4),), r"flat\.onnx: input 'in0' has 2 dimensions"),
        "bytes": (FromBytes(), (image.to(torch.uint8),), r"bytes\.onnx: input 'in0' is uint8"),
        "conv": (torch.nn.Conv2d(3, 2, 3), (image,), r"conv\.onnx: output .* has shape \[.*, 2, 6, 6\]; xai needs logits"),
    }
    for name, (module, example, message) in cases.items():
        path = export_onnx(module, example, tmp_path / f"{name}.onnx", dynamic=True)
        with pytest.raises(UsageError, match=message):
            onnx_loader.load(str(path), CPU)


# --- timm ----------------------------------------------------------------------------------------

def test_timm_resnet18_random_init():
    model = timm_loader.load("timm:resnet18", CPU, num_classes=10)
    assert model.spec.size == (224, 224) and model.spec.mean == IMAGENET_MEAN and model.spec.std == IMAGENET_STD
    assert model.spec.interpolation == "bicubic" and model.spec.crop_pct == 0.95
    assert model.digest == "timm:resnet18:random-init" and model.differentiable
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    labels = timm_loader.imagenet_labels(timm_loader.load("timm:resnet18", CPU).module)
    assert len(labels) == 1000 and labels[:2] == ["tench", "goldfish"]
    assert timm_loader.imagenet_labels(model.module) is None  # a 10-class head is not ImageNet


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_checkpoint_round_trip(tmp_path, suffix):
    torch.manual_seed(0)
    source = timm_loader.load("timm:test_resnet", CPU, num_classes=5)
    with torch.no_grad():  # trained weights: not the loader's (seeded) random init
        for p in source.module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    state = {k: v.contiguous() for k, v in source.module.state_dict().items()}
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:  # a DDP training checkpoint: nested and prefixed
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source(x)
        loaded = timm_loader.load("timm:test_resnet", CPU, num_classes=5, weights=str(path))
        fresh = timm_loader.load("timm:test_resnet", CPU, num_classes=5)
        assert torch.equal(loaded(x), expected)
        assert not torch.allclose(fresh(x), expected)
        # a random init is seeded: every replica and rerun of `timm:NAME` has the same weights
        assert torch.equal(fresh(x), timm_loader.load("timm:test_resnet", CPU, num_classes=5)(x))
    assert loaded.digest == sha256(path)


def test_timm_checkpoint_that_does_not_fit(tmp_path):
    path = tmp_path / "five.pth"
    torch.save(timm_loader.load("timm:test_resnet", CPU, num_classes=5).module.state_dict(), path)
    with pytest.raises(UsageError) as info:
        timm_loader.load("timm:test_resnet", CPU, weights=str(path))
    message = str(info.value)
    assert "five.pth do not match" in message and "shape differs: fc.weight (5," in message
    assert "num_classes" in message
    eager = tmp_path / "eager.pth"
    torch.save(timm_loader.load("timm:test_resnet", CPU).module, eager)
    with pytest.raises(UsageError, match=r"eager\.pth could not be read as a state dict"):
        timm_loader.load("timm:test_resnet", CPU, weights=str(eager))


def test_timm_unknown_names_get_suggestions():
    with pytest.raises(UsageError, match=r"unknown timm model 'timm:resnt18' \(did you mean 'resnet18'\?\)"):
        timm_loader.load("timm:resnt18", CPU)
    with pytest.raises(UsageError, match=r"no pretrained tag 'a1_in2k' .*did you mean 'resnet18.a1_in1k'"):
        timm_loader.load("timm:resnet18.a1_in2k", CPU)


def test_timm_pretrained_offline_fails_fast_and_suggests_weights(monkeypatch, tmp_path):
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # no cached copy either
    connects = []  # fast means: not one connection tried (no waits for timeouts or retries)

    def refuse(sock: socket.socket, address: object) -> None:
        connects.append(address)
        raise OSError("the test forbids network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(UsageError) as info:
        timm_loader.load("timm:resnet18", CPU, pretrained=True)
    assert connects == []
    assert str(info.value).startswith("timm:resnet18: pretrained weights could not be downloaded (no network access)")
    assert "--set model_options.weights=PATH" in str(info.value)
    assert constants.HF_HUB_OFFLINE is before  # offline mode was only switched on for the call


def test_hub_probe_gives_up_quickly_on_an_unreachable_endpoint(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    calls = []  # one connection attempt, bounded by the timeout (no retries)
    connect = socket.create_connection
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: calls.append((address, timeout)) or connect(address, timeout))
    assert timm_loader.hub_reachable(timeout=2.0) is False
    assert calls == [(("127.0.0.1", port), 2.0)]


# --- registry ------------------------------------------------------------------------------------

def test_registry_routes_specs_to_loaders():
    registry = create_registry()
    routes = {"x.onnx": "onnx", "m.pt": "torchscript", "m.PTH": "torchscript", "m.ts": "torchscript",
              "m.torchscript": "torchscript", "timm:resnet18": "timm"}
    assert {spec: registry.loader_for(spec).name for spec in routes} == routes
    with pytest.raises(UsageError, match="no model loader handles 'model.h5'"):
        registry.loader_for("model.h5")
    timm_params = {p.name: p.default for p in registry.get("loader", "timm").params}
    assert timm_params == {"pretrained": False, "weights": None, "num_classes": None}
    assert [p.name for p in registry.get("loader", "onnx").params] == ["threads"]
