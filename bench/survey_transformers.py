"""Survey: timm vision transformers and hybrids × model formats -> does xai explain them?

For each family a random-init model with the smallest config timm accepts (reduced depth and
width, 32-64 px input) is tried in each format:

- eager:      the nn.Module itself (`xaicli.explain(module, ...)`)
- ts_trace:   torch.jit.trace, saved with an xai.json extra file
- ts_script:  torch.jit.script where timm's code allows it
- onnx_ts17:  torch.onnx.export, TorchScript-based exporter, opset 17, dynamic batch
- onnx_dyn18: torch.onnx.export(dynamo=True), opset 18, dynamic batch
  (`--opsets 17 18 19 20 21` adds the other opsets: legacy up to 20, dynamo 18-21)

A pair works when `model.graph()` builds, its logits match the model within 1e-4 (max
|difference| relative to max |logit|), and `xaicli.explain(..., methods=[lrp, gradcam,
integrated_gradients])` exits 0. Each family runs in its own subprocess (a timeout or a crash
costs that family only). Prints the table and the count of working pairs::

    .venv/bin/python bench/survey_transformers.py                 # every family, ~5-10 min on 2 cores
    .venv/bin/python bench/survey_transformers.py vit swin        # some families
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

TOLERANCE = 1e-4
METHODS = ["lrp", "gradcam", "integrated_gradients"]
FORMATS = ["eager", "ts_trace", "ts_script", "onnx_ts17", "onnx_dyn18"]


def _metaformer(**kw: Any) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        from timm.models import metaformer as mf

        return mf.MetaFormer(num_classes=10, depths=(1, 1, 1, 1), dims=(16, 32, 64, 64), **kw)

    return make


def _poolformer() -> torch.nn.Module:
    from torch import nn
    from timm.models import metaformer as mf

    return mf.MetaFormer(num_classes=10, depths=(1, 1, 1, 1), dims=(16, 32, 64, 64), downsample_norm=None,
                         mlp_act=nn.GELU, mlp_bias=True, norm_layers=mf.GroupNorm1, layer_scale_init_values=1e-5,
                         res_scale_init_values=None, use_mlp_head=False)


def _caformer() -> torch.nn.Module:
    from timm.models import metaformer as mf

    return _metaformer(token_mixers=[mf.SepConv, mf.SepConv, mf.Attention, mf.Attention],
                       norm_layers=[mf.LayerNorm2dNoBias] * 2 + [mf.LayerNormNoBias] * 2)()


def _convformer() -> torch.nn.Module:
    from timm.models import metaformer as mf

    return _metaformer(token_mixers=mf.SepConv)()


# family -> (timm name or factory, input size, create_model kwargs)
FAMILIES: dict[str, tuple[str | Callable[[], torch.nn.Module], int, dict[str, Any]]] = {
    "vit": ("vit_tiny_patch16_224", 32, dict(img_size=32, patch_size=8, depth=2)),
    "deit": ("deit_tiny_distilled_patch16_224", 32, dict(img_size=32, patch_size=8, depth=2)),
    "beit": ("beit_base_patch16_224", 32, dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)),
    "swin": ("swin_tiny_patch4_window7_224", 64, dict(img_size=64, window_size=4, depths=(1, 1, 1, 1), embed_dim=16,
                                                      num_heads=(1, 1, 2, 2))),
    "swinv2": ("swinv2_tiny_window8_256", 64, dict(img_size=64, window_size=4, depths=(1, 1, 1, 1), embed_dim=16,
                                                   num_heads=(1, 1, 2, 2))),
    "levit": ("levit_128s", 64, dict(img_size=64)),
    "mobilevit": ("mobilevit_xxs", 64, {}),
    "efficientvit_b0": ("efficientvit_b0", 64, {}),
    "efficientvit_m0": ("efficientvit_m0", 64, dict(img_size=64)),
    "maxvit": ("maxvit_nano_rw_256", 64, dict(img_size=64)),
    "coat": ("coat_lite_tiny", 64, dict(img_size=64)),
    "cait": ("cait_xxs24_224", 32, dict(img_size=32, patch_size=8, depth=2, depth_token_only=1)),
    "eva": ("eva02_tiny_patch14_224", 56, dict(img_size=56, depth=2)),
    "caformer": (_caformer, 64, {}),
    "convformer": (_convformer, 64, {}),
    "pit": ("pit_ti_224", 64, dict(img_size=64)),
    "twins": ("twins_svt_small", 64, dict(img_size=64, depths=(1, 1, 1, 1))),
    "xcit": ("xcit_nano_12_p16_224", 32, dict(img_size=32, depth=2)),
    "convnext": ("convnext_atto", 64, dict(depths=(1, 1, 1, 1), dims=(16, 32, 64, 64))),
    "poolformer": (_poolformer, 64, {}),
}


def build(family: str) -> tuple[torch.nn.Module, int]:
    """The family's tiny random-init model (seeded) in eval mode, and its input size."""
    import timm

    make, size, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    module = make() if callable(make) else timm.create_model(make, pretrained=False, num_classes=10, **kwargs)
    return module.eval(), size


def export_file(module: torch.nn.Module, fmt: str, size: int, folder: Path) -> Path | None:
    """Write `module` in format `fmt` (with its xai.json input spec) under `folder`; None for eager."""
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    spec = json.dumps({"size": size, "crop_pct": 1.0})
    if fmt.startswith("ts_"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            script = torch.jit.trace(module, x, check_trace=False) if fmt == "ts_trace" else torch.jit.script(module)
        path = folder / f"{fmt}.pt"
        torch.jit.save(script, str(path), _extra_files={"xai.json": spec})
        return path
    if fmt.startswith("onnx_"):
        import onnx

        dynamo, opset = fmt.startswith("onnx_dyn"), int(fmt[-2:])
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                torch.onnx.export(module, (x,), buffer, dynamo=True, opset_version=opset, verbose=False,
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
            else:
                torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=opset, input_names=["x"],
                                  output_names=["logits"], dynamic_axes={"x": {0: "batch"}})
        proto = onnx.load_from_string(buffer.getvalue())
        onnx.helper.set_model_props(proto, {"xai.json": spec})
        path = folder / f"{fmt}.onnx"
        onnx.save(proto, str(path))
        return path
    return None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def try_pair(family: str, fmt: str, folder: Path, image: Path) -> str:
    """'ok' or the stage and first line of the first failure."""
    import xaicli
    from xaicli.registry import default_registry

    module, size = build(family)
    try:
        path = export_file(module, fmt, size, folder)
    except Exception as exc:
        return f"export: {first_line(exc)}"
    try:
        if path is None:
            from xaicli.model import InputSpec, model_from_module

            model = model_from_module(module, torch.device("cpu"), spec=InputSpec(size=(size, size)))
        else:
            loader = default_registry().loader_for(str(path))
            model = loader.load(str(path), torch.device("cpu"))
        gm = model.graph()
        x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            want, got = module(x), gm(x)
        error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        if not error <= TOLERANCE:
            return f"parity: relative error {error:.2g}"
    except Exception as exc:
        return f"graph: {first_line(exc)}"
    out = folder / f"out_{fmt}"
    try:
        target = module if path is None else str(path)
        extra = {"preprocess": {"size": size, "crop_pct": 1.0}} if path is None else {}
        result = xaicli.explain(target, [str(image)], methods=METHODS, output=str(out), overwrite=True, **extra)
    except Exception as exc:
        return f"explain: {first_line(exc)}"
    if result.exit_code != 0:
        errors = "; ".join(f"{e.get('method', '')} {e.get('error', e)}"[:160] for e in result.errors[:1])
        return f"explain exit {result.exit_code}: {errors}"
    return "ok"


def run_family(family: str, formats: list[str]) -> dict[str, str]:
    from PIL import Image

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        image = folder / "photo.png"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
        for fmt in formats:
            start = time.perf_counter()
            try:
                results[fmt] = try_pair(family, fmt, folder, image)
            except BaseException as exc:  # a survey records every failure, whatever it is
                results[fmt] = f"crash: {first_line(exc)}"
            results[fmt + ":s"] = f"{time.perf_counter() - start:.1f}"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--formats", nargs="*", default=FORMATS)
    parser.add_argument("--opsets", nargs="*", type=int, default=[], help="extra ONNX opsets (17-21)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per family")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args()
    formats = list(args.formats)
    for opset in args.opsets:
        formats += [f for f in (f"onnx_ts{opset}" if opset <= 20 else "", f"onnx_dyn{opset}" if opset >= 18 else "")
                    if f and f not in formats]
    if args.one:
        print("RESULT " + json.dumps(run_family(args.one, formats)))
        return
    table: dict[str, dict[str, str]] = {}
    for family in args.families:
        cmd = [sys.executable, __file__, "--one", family, "--formats", *formats]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
            table[family] = json.loads(line[-1][7:]) if line else {f: f"crash: {proc.stderr.strip()[-160:]}" for f in formats}
        except subprocess.TimeoutExpired:
            table[family] = {f: f"timeout after {args.timeout:.0f} s" for f in formats}
        row = table[family]
        if args.json:
            args.json.write_text(json.dumps(table, indent=1))
        print(f"{family:16s} " + "  ".join(f"{f}={'ok' if row.get(f) == 'ok' else 'FAIL'}({row.get(f + ':s', '-')}s)"
                                              for f in formats), flush=True)
    print()
    ok = sum(row.get(f) == "ok" for row in table.values() for f in formats)
    for family, row in table.items():
        for fmt in formats:
            print(f"{family:16s} {fmt:11s} {row.get(fmt)}")
    print(f"\nworking pairs: {ok} of {len(table) * len(formats)}")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
