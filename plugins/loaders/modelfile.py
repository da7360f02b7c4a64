"""What the file-based loaders share: checking a model file, its digest, and the embedded input spec.

The ``xai.json`` convention: a model file may carry its input spec as a small JSON object, so
that ``xai explain model.pt photos/`` needs no preprocessing flags. TorchScript stores it as an
extra file (``torch.jit.save(m, path, _extra_files={"xai.json": ...})``), ONNX as the
``metadata_props`` entry ``xai.json``; timm weight files do not need it (timm knows its config).
Keys, all optional::

    {"size": 224 | [H, W], "channels": 3, "mean": [...], "std": [...],
     "interpolation": "bilinear", "crop_pct": 0.875, "labels": ["cat", "dog", ...]}

`mean`/`std` take one value per channel (or a single value for all). Missing keys fall back to
ImageNet defaults: 224×224, 3 channels, ImageNet mean/std, crop_pct 0.875, bilinear.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from xaicli.errors import UsageError
from xaicli.model import DEFAULT_SPEC, InputSpec

SPEC_KEYS = ("size", "channels", "mean", "std", "interpolation", "crop_pct")


def existing_file(spec: str, what: str) -> Path:
    """The path `spec` names, checked to be a file; `what` names it in messages ("ONNX model file")."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise UsageError(f"{what} {spec} does not exist")
    if not path.is_file():
        raise UsageError(f"{what} {spec} is not a file")
    return path


def file_digest(path: Path) -> str:
    """'sha256:<hex>' of a file's bytes: identifies the exact model in run.json."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return f"sha256:{sha.hexdigest()}"


def first_line(exc: BaseException) -> str:
    """The headline of an exception from torch/onnx/timm (their messages run on with C++ traces)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe_non_model(head: bytes) -> str:
    """A user-level guess, from its first bytes, at what a file in the wrong format holds."""
    if not head:
        return "the file is empty"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the model itself (run `git lfs pull`)"
    if head.startswith(b"PK\x03\x04"):
        return "the zip archive is truncated or damaged (incomplete download?)"
    text = head.decode("utf-8", "replace")  # one character cut at the end of `head` may not decode
    if sum(c.isprintable() or c in "\t\r\n" for c in text) >= len(text) - 1:
        return "it is a text file"
    return "the file is truncated or not a model file (incomplete download?)"


def spec_for(**fields: Any) -> InputSpec:
    """DEFAULT_SPEC with `fields` applied; mean/std default to the ImageNet averages when the
    channel count is not 3 and none are given."""
    channels = fields.get("channels") or DEFAULT_SPEC.channels
    if channels != DEFAULT_SPEC.channels:
        for key in ("mean", "std"):
            default = getattr(DEFAULT_SPEC, key)
            fields.setdefault(key, [sum(default) / len(default)])
    return DEFAULT_SPEC.override(**fields)


def parse_xai_json(text: str | bytes, source: str) -> tuple[dict[str, Any], list[str] | None]:
    """(spec fields, labels) from an embedded xai.json; UsageError naming `source` when malformed."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"model {source}: its embedded xai.json is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise UsageError(f"model {source}: its embedded xai.json must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SPEC_KEYS) - {"labels"})
    if unknown:
        raise UsageError(f"model {source}: unknown key(s) in its embedded xai.json: {', '.join(unknown)} "
                         f"(known: {', '.join(SPEC_KEYS)}, labels)")
    labels = data.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(s, str) for s in labels)):
        raise UsageError(f"model {source}: 'labels' in its embedded xai.json must be a list of strings")
    return {k: data[k] for k in SPEC_KEYS if k in data}, labels


def checked_spec(fields: dict[str, Any], source: str) -> InputSpec:
    """spec_for(**fields), with a bad value reported against the model file."""
    try:
        return spec_for(**fields)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"model {source}: bad input spec in its embedded xai.json: {exc}") from exc
