"""The HTML report of a run: `build_report(run_dir, out, evaluation=..., analysis=...)`."""
from .build import build_report

__all__ = ["build_report"]
