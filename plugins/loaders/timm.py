"""timm loader: `timm:NAME` (or `timm:NAME.TAG`), random-init, pretrained, or a local checkpoint.

Input spec from timm's data config for the model. Pretrained weights come through the Hugging
Face hub; when it cannot be reached, the hub is queried in offline mode (local cache only) so a
machine without network fails in a fraction of a second instead of retrying for ~45 s.
"""
from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Mapping

import timm
import torch
from timm.data import ImageNetInfo, infer_imagenet_subset, resolve_data_config

from xaicli import Loader, Param, hookimpl
from xaicli.errors import UsageError
from xaicli.model import InputSpec, Model, spec_from_config
from xaicli.suggest import did_you_mean

from .modelfile import describe_non_model, existing_file, file_digest, first_line

PREFIX = "timm:"
HUB = "https://huggingface.co"


def claims(spec: str) -> bool:
    return spec.startswith(PREFIX)


def model_name(spec: str) -> str:
    """The timm name in `spec` (NAME or NAME.TAG), checked against timm's registry, with a did-you-mean."""
    name = spec[len(PREFIX):].strip()
    architecture, _, tag = name.partition(".")
    if not timm.is_model(architecture):
        raise UsageError(f"unknown timm model {spec!r}{did_you_mean(architecture, timm.list_models())}; "
                         "see timm.list_models() for the names")
    tagged = timm.list_pretrained(f"{architecture}.*")
    if tag and name not in tagged:
        raise UsageError(f"{spec}: timm has no pretrained tag {tag!r} for {architecture}{did_you_mean(name, tagged)}; "
                         f"known: {', '.join(tagged) or 'none'}")
    return name


def create(name: str, pretrained: bool, num_classes: int | None) -> torch.nn.Module:
    """The timm model; a random init is seeded (0), so every replica and rerun gets the same weights."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=pretrained, **kwargs)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub (or the configured HTTPS proxy) opens within `timeout`."""
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    url = urllib.request.getproxies().get("https") or os.environ.get("HF_ENDPOINT") or HUB
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    try:
        socket.create_connection((parts.hostname or "", parts.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def hub_offline(offline: bool) -> Iterator[None]:
    """huggingface_hub's offline mode (cache only) for the duration; its env var is read at import."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def pretrained_model(spec: str, name: str, num_classes: int | None) -> torch.nn.Module:
    """The model with timm's pretrained weights, from the hub or its local cache."""
    online = hub_reachable()
    try:
        with hub_offline(not online):
            return create(name, True, num_classes)
    except Exception as exc:  # hub, HTTP and file errors differ by version; all mean "no weights"
        if not online:
            raise UsageError(
                f"{spec}: pretrained weights could not be downloaded (no network access). Download them on a "
                "connected machine and pass a local checkpoint: --set model_options.weights=PATH "
                "(or model_options: {weights: PATH} in a recipe)"
            ) from exc
        raise UsageError(f"{spec}: pretrained weights could not be downloaded: {first_line(exc)}") from exc


def imagenet_labels(model: torch.nn.Module) -> list[str] | None:
    """Class names of an ImageNet-pretrained head ("tench", "goldfish", ...), shipped with timm."""
    subset = infer_imagenet_subset(model)
    return [d.split(",")[0] for d in ImageNetInfo(subset).label_descriptions()] if subset else None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint: safetensors, or a weights-only torch.load; nested and DDP forms accepted.
    A file that is neither (text, an image, a truncated download) is named with what it looks like."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    checkpoint = head.startswith((b"PK\x03\x04", b"\x80")) or path.suffix == ".safetensors"
    if not checkpoint:  # torch.load reads such files as a legacy tar/pickle and fails obscurely
        raise UsageError(f"weights file {path} is not a checkpoint (.safetensors, or a torch.save zip or "
                         f"pickle): {describe_non_model(head)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path), device="cpu")
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors errors; weights_only refuses pickled objects
        raise UsageError(f"weights file {path} could not be read as a state dict: {first_line(exc)}") from exc
    for key in ("state_dict", "model"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise UsageError(f"weights file {path} does not hold a state dict (a mapping of names to tensors)")
    return {k.removeprefix("module."): v for k, v in data.items()}


def check_keys(spec: str, path: Path, model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """UsageError listing (a few) missing, unexpected and differently shaped tensors."""
    own = model.state_dict()
    problems = []
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in file vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape differs", shapes)):
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            problems.append(f"{label}: {', '.join(keys[:3])}{more}")
    if problems:
        hint = " (set model_options.num_classes to the checkpoint's class count?)" if shapes else ""
        raise UsageError(f"{spec}: weights {path} do not match the model: {'; '.join(problems)}{hint}")


def input_spec(model: torch.nn.Module) -> InputSpec:
    return spec_from_config(resolve_data_config({}, model=model))


def load(spec: str, device: torch.device, pretrained: bool = False, weights: str | None = None,
         num_classes: int | None = None) -> Model:
    """A timm model in eval mode on `device`: random init, pretrained, or from a local checkpoint."""
    name = model_name(spec)
    if pretrained and weights:
        raise UsageError(f"{spec}: give either model_options.pretrained or model_options.weights, not both")
    path = existing_file(weights, "weights file") if weights else None
    state = read_state_dict(path) if path else None  # before building the model: a bad file fails fast
    labels = None
    if pretrained:
        module = pretrained_model(spec, name, num_classes)
        cfg, labels = module.pretrained_cfg, imagenet_labels(module)
        digest = f"timm:{cfg['architecture']}.{cfg['tag']}:pretrained" if cfg.get("tag") else f"timm:{name}:pretrained"
    else:
        module, digest = create(name, False, num_classes), f"timm:{name}:random-init"
    if path is not None and state is not None:
        check_keys(spec, path, module, state)
        module.load_state_dict(state)
        digest = file_digest(path)
    return Model(name=name, spec=input_spec(module), device=device, module=module.to(device).eval(),
                 labels=labels, digest=digest, source=spec)


@hookimpl
def xai_loaders() -> list[Loader]:
    return [
        Loader(
            "timm",
            "timm:NAME image model (random init, pretrained, or a local checkpoint); spec from timm's data config",
            claims,
            load,
            (
                Param("pretrained", bool, False, "download timm's pretrained weights (needs network or a cached copy)"),
                Param("weights", str, None, "local checkpoint: .safetensors, or a state dict saved with torch.save"),
                Param("num_classes", int, None, "classifier size when it differs from the model's default", low=1,
                      high=100_000),
            ),
        )
    ]
