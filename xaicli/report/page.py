"""The report folder: index.html, the page's script and style, data files, thumbnails.

Data reach the page as `data/*.js` files that assign JSON (parsed with JSON.parse from an ASCII
string literal) to `window.XAI`: loaded with <script src>, they work from file:// where fetch does
not. Every text that comes from inputs (paths, method and class names) is rendered by the page with
textContent, never as markup; the only markup Python writes is the template, escaped.
"""
from __future__ import annotations

import html
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..io import atomic_write, atomic_write_bytes
from ..render import COLORMAPS, colormap
from .collect import Analysis, Evaluation, Keys, Run
from .thumbnails import COLUMNS, PER_SHEET, Table

MARKER = ".xai-report"  # a folder holding it was written by `xai report` and may be rewritten
OWNED = ("thumbs", "data", "analysis", "assets")
ASSETS = ("report.js", "report.css")
DEFAULT_COLORMAP = "bwr"


def prepare(out: Path) -> None:
    """Make `out` an empty report folder; refuse a non-empty folder that is not a report."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"report folder {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise UsageError(f"report folder {out} is not empty and holds no earlier report; choose another with -o")
    for name in OWNED:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    atomic_write_bytes(out / MARKER, b"written by xai report\n", root=out)


def write_page(out: Path, run: Run, table: Table, tile: int, evaluation: Evaluation | None,
               analysis: Analysis | None, sources: dict[str, str]) -> None:
    """Everything but the thumbnails: data files, assets, copied analysis pictures, index.html."""
    keys = Keys(run.keys)
    names = _names(run, evaluation)
    data: dict[str, Any] = {
        "meta": {"title": run.folder.resolve().name, "tile": tile, "perSheet": PER_SHEET, "columns": COLUMNS,
                 "methods": run.methods, "labels": run.labels, "colormaps": list(COLORMAPS),
                 "colormap": DEFAULT_COLORMAP, "sources": sources},
        "provenance": _provenance(run, table),
    }
    _write_js(out / "data" / "items.js", "items", {
        "names": names, "target": table.target, "predicted": table.predicted, "inputs": [int(v) for v in table.inputs],
        "present": [[int(v) for v in table.present[m]] for m in run.methods],
        "prob": [table.prob[m] for m in run.methods]}, out)
    if evaluation is not None:
        data["evaluation"] = _evaluation(evaluation, keys, run.methods)
    if analysis is not None:
        data["analysis"] = _analysis(analysis, keys, run.methods, out)
    _write_js(out / "data" / "report.js", "report", data, out)
    for name in ASSETS:
        atomic_write_bytes(out / "assets" / name, resources.files(__package__).joinpath("assets", name).read_bytes(), root=out)
    template = resources.files(__package__).joinpath("assets", "index.html").read_text(encoding="utf-8")
    page = template.replace("{{title}}", html.escape(f"xai report: {data['meta']['title']}")).replace("{{filters}}", _filters())
    atomic_write_bytes(out / "index.html", page.encode("utf-8"), root=out)


def _names(run: Run, evaluation: Evaluation | None) -> list[str]:
    """Input names shown: relative paths where the scores name them, stems otherwise."""
    names = list(run.keys)
    if evaluation is not None:
        keys = Keys(run.keys)
        for relpath, *_ in evaluation.rows:
            i = keys.find(relpath)
            if i is not None:
                names[i] = relpath
    return names


def _write_js(path: Path, name: str, value: Any, root: Path) -> None:
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False, default=_plain)
    literal = json.dumps(text).replace("<", "\\u003c")
    atomic_write_bytes(path, f"window.XAI=window.XAI||{{}};window.XAI[{json.dumps(name)}]=JSON.parse({literal});\n".encode(),
                       root=root)


def _plain(value: Any) -> Any:
    return str(value)


def _provenance(run: Run, table: Table) -> dict[str, Any]:
    m = run.manifest
    return {"model": m.get("model", {}), "engine": m.get("engine", {}), "versions": m.get("versions", {}),
            "counts": m.get("counts", {}), "inputs": m.get("inputs"), "timings": m.get("timings", {}),
            "seed": m.get("seed"), "xai": m.get("xai"), "recipe": m.get("recipe", {}),
            "errors": run.errors, "problems": table.problems, "folder": str(run.folder)}


def _evaluation(evaluation: Evaluation, keys: Keys, methods: list[str]) -> dict[str, Any]:
    """Summary per metric (ranking), per-input scores as rows [input, method, score per metric], curves."""
    summary = evaluation.summary["metrics"]
    metrics = [k for k in summary if "/" not in k] + [k for k in summary if "/" in k and not k.split("/")[-1].startswith("curve_")]
    extra = [m for m in evaluation.summary.get("methods", []) if m not in methods]
    order = methods + extra
    index = {m: i for i, m in enumerate(order)}
    column = {k: i for i, k in enumerate(metrics)}
    rows: dict[tuple[str, str], list[Any]] = {}
    unknown: list[str] = []
    for relpath, method, metric, score in evaluation.rows:
        if metric not in column or method not in index:
            continue
        row = rows.get((relpath, method))
        if row is None:
            item = keys.find(relpath)
            if item is None:
                unknown.append(relpath)
            row = rows[(relpath, method)] = [item if item is not None else relpath, index[method]] + [None] * len(metrics)
        row[2 + column[metric]] = score if score == score and abs(score) != float("inf") else None
    table = [{"key": k, "higherIsBetter": summary[k].get("higher_is_better"), "ranking": summary[k].get("ranking", []),
              "methods": {m: _stats(s) for m, s in summary[k].get("methods", {}).items()}} for k in metrics]
    return {"folder": str(evaluation.folder), "methods": order, "metrics": metrics, "summary": table,
            "rows": list(rows.values()), "curves": evaluation.curves, "unknown": len(set(unknown))}


def _stats(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if not isinstance(v, float) or abs(v) != float("inf") else str(v)) for k, v in entry.items()}


def _analysis(analysis: Analysis, keys: Keys, methods: list[str], out: Path) -> dict[str, Any]:
    """Groups with inputs mapped to the gallery's rows; mean heatmaps copied next to the page."""
    groups = []
    copied: set[str] = set()
    for group in analysis.data["groups"]:
        members = [keys.find(str(name)) for name in group["inputs"]]
        clusterings = {}
        for name, c in group["clusterings"].items():
            means = {}
            for cluster, rel in (c.get("means") or {}).items():
                source = analysis.folder / rel
                target = Path("analysis") / rel
                if source.is_file():
                    if rel not in copied:
                        atomic_write(out / target, lambda fh, s=source: fh.write(s.read_bytes()), root=out)
                        copied.add(rel)
                    means[str(cluster)] = target.as_posix()
            clusterings[name] = {
                "labels": [int(v) for v in c["labels"]], "sizes": {str(k): int(v) for k, v in (c.get("sizes") or {}).items()},
                "prototypes": {str(k): keys.find(str(v)) for k, v in (c.get("prototypes") or {}).items()},
                "prototypeNames": {str(k): str(v) for k, v in (c.get("prototypes") or {}).items()},
                "means": means}
        groups.append({
            "method": group["method"], "methodIndex": methods.index(group["method"]) if group["method"] in methods else -1,
            "class": group["class"], "classSource": group.get("class_source", "target"),
            "members": members, "names": [str(n) for n in group["inputs"]],
            "eigenvalues": [float(v) for v in group["eigenvalues"]], "eigengap": group.get("eigengap"),
            "suggested": group.get("suggested") or next(iter(clusterings), ""), "clusterings": clusterings,
            "views": {k: [[float(p[0]), float(p[1])] for p in v] for k, v in (group.get("views") or {}).items()}})
    return {"folder": str(analysis.folder), "settings": analysis.data.get("settings", {}), "groups": groups}


def _filters() -> str:
    """One SVG filter per colormap: gray value g (the colormap index) -> the palette's colour g."""
    out = []
    for name in COLORMAPS:
        palette = colormap(name).palette / 255.0
        funcs = "".join(
            f'<feFunc{channel} type="table" tableValues="{" ".join(f"{v:.4g}" for v in palette[:, c])}"/>'
            for c, channel in enumerate("RGB"))
        out.append(f'<filter id="cm-{html.escape(name)}" color-interpolation-filters="sRGB" x="0" y="0" width="1" height="1">'
                   f'<feComponentTransfer>{funcs}</feComponentTransfer></filter>')
    return "\n".join(out)
