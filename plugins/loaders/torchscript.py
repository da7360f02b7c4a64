"""TorchScript loader: `.pt`, `.pth`, `.ts`, `.torchscript` archives made by torch.jit.save.

The archive is inspected as a zip before loading, so an eager `torch.save(model)` pickle (or a
state dict) is refused with advice instead of being unpickled: unpickling runs arbitrary code.
The input spec comes from the archive's extra file ``xai.json`` (see modelfile.py for the keys);
without it, ImageNet defaults apply (224, 3 channels, ImageNet mean/std, crop_pct 0.875).
"""
from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import torch

from xaicli import Loader, hookimpl
from xaicli.errors import UsageError
from xaicli.model import Model

from .modelfile import checked_spec, describe_non_model, existing_file, file_digest, first_line, parse_xai_json

SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")
EXPORT_ADVICE = (
    "export it with torch.jit.script(model) or torch.jit.trace(model, example) and save that with torch.jit.save"
)


def claims(spec: str) -> bool:
    return spec.lower().endswith(SUFFIXES)


def check_archive(path: Path) -> None:
    """Raise UsageError unless `path` is a TorchScript zip archive (it has compiled code)."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as fh:
            head = fh.read(512)
        if head[:1] == b"\x80":
            cause = f"it is a legacy torch.save pickle; {EXPORT_ADVICE}"
        else:
            cause = describe_non_model(head)
        raise UsageError(f"model file {path} is not a TorchScript archive: {cause}")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if not any("/code/" in name for name in names):
        raise UsageError(
            f"model file {path} is not a TorchScript archive: it looks like an eager model or state dict "
            f"saved with torch.save, which xai does not unpickle; {EXPORT_ADVICE} (for a timm checkpoint, "
            "use timm:NAME with --set model_options.weights=PATH)"
        )


def load(spec: str, device: torch.device) -> Model:
    """torch.jit.load onto `device`, in eval mode, with the spec from the archive's xai.json."""
    path = existing_file(spec, "TorchScript model file")
    check_archive(path)
    extra = {"xai.json": ""}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as exc:  # torch reports every load failure as RuntimeError with a C++ trace
        raise UsageError(f"model file {spec} could not be loaded by torch.jit.load: {first_line(exc)}") from exc
    fields, labels = parse_xai_json(extra["xai.json"], spec) if extra["xai.json"] else ({}, None)
    return Model(
        name=path.stem,
        spec=checked_spec(fields, spec),
        device=device,
        module=module.eval(),
        labels=labels,
        digest=file_digest(path),
        source=spec,
    )


@hookimpl
def xai_loaders() -> list[Loader]:
    return [
        Loader(
            "torchscript",
            "TorchScript archive (.pt/.pth/.ts/.torchscript); input spec from its xai.json extra file",
            claims,
            load,
        )
    ]
