"""`xai report`: a static, self-contained HTML folder for a run, its evaluation and its analysis."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UsageError
from .collect import Evaluation, evaluation_from_manifest, read_analysis, read_evaluation, read_run
from .page import prepare, write_page
from .thumbnails import write_thumbnails

DEFAULT_TILE = 64


def build_report(run_dir: Path | str, out: Path | str | None = None, evaluation: Path | str | None = None,
                 analysis: Path | str | None = None, tile: int = DEFAULT_TILE,
                 manifest: dict[str, Any] | None = None) -> Path:
    """Write the report of `run_dir` to `out` (default RUN_DIR/report) and return the index.html path.

    `evaluation`: an `xai evaluate` folder (default: RUN_DIR itself when it holds metrics.csv).
    `analysis`: an `xai analyze` folder (default: RUN_DIR/analysis when it exists).
    `manifest`: the run's manifest when run.json is not written yet (the `report` writer).
    """
    run_dir = Path(run_dir)
    if not 16 <= tile <= 256:
        raise UsageError(f"thumbnail size {tile} is out of range: 16 to 256 pixels")
    run = read_run(run_dir, manifest)
    out = Path(out) if out is not None else run_dir / "report"
    scores = _evaluation(run_dir, evaluation, manifest)
    if analysis is None and (run_dir / "analysis" / "analysis.json").is_file():
        analysis = run_dir / "analysis"
    groups = read_analysis(Path(analysis)) if analysis is not None else None
    if not run.keys and scores is None:
        raise UsageError(f"{run_dir}: no arrays/<method>/*.npz and no scores to report; "
                         "the report needs the npz writer's arrays (or an evaluation)")
    prepare(out)
    table = write_thumbnails(run, out, tile, root=out)
    sources = {"run": str(run_dir), "evaluation": str(scores.folder) if scores else "",
               "analysis": str(groups.folder) if groups else ""}
    write_page(out, run, table, tile, scores, groups, sources)
    return out / "index.html"


def _evaluation(run_dir: Path, evaluation: Path | str | None, manifest: dict[str, Any] | None) -> Evaluation | None:
    if evaluation is not None:
        return read_evaluation(Path(evaluation))
    if manifest is not None:
        return evaluation_from_manifest(run_dir, manifest)
    if (run_dir / "metrics.csv").is_file():
        return read_evaluation(run_dir)
    return None
