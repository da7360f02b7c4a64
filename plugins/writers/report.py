"""The `report` writer: the run's static HTML report (see xaicli.report), built when the run closes.

Not per input (`expected()` is empty, like the summary writers): at close it reads the run folder's
arrays, errors.jsonl and the scores in the manifest, so enable it together with the npz writer.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xaicli import Param, Writer, hookimpl
from xaicli.descriptors import BatchOutput, InputItem, WriterContext
from xaicli.errors import UsageError

PARAMS = (
    Param("folder", str, "report", "report folder, relative to the run's output folder"),
    Param("thumb_size", int, 64, "thumbnail side in pixels", low=16, high=256),
)


@dataclass(frozen=True)
class ReportSink:
    """Builds the report at close from what the run wrote; keeps nothing per batch."""

    out_dir: Path
    folder: str
    thumb_size: int

    def expected(self, item: InputItem, output: str) -> list[Path]:
        return []

    def write(self, batch: BatchOutput) -> None:
        """Nothing per batch: the report reads the run's files at close."""

    def close(self, run: dict[str, Any]) -> None:
        from xaicli.report import build_report

        build_report(self.out_dir, self.out_dir / self.folder, tile=self.thumb_size, manifest=run)


def open_report(ctx: WriterContext, folder: str = "report", thumb_size: int = 64) -> ReportSink:
    if Path(folder).is_absolute() or ".." in Path(folder).parts or not Path(folder).parts:
        raise UsageError(f"writers.report.folder: {folder!r} must be a folder inside the output folder, e.g. report")
    return ReportSink(Path(ctx.out_dir), folder, thumb_size)


@hookimpl
def xai_writers() -> list[Writer]:
    return [Writer("report", "static HTML report of the run (gallery, metrics, provenance): report/index.html",
                   open_report, PARAMS)]
