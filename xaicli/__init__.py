"""xai: batch explanations for neural networks.

Python API (what the CLI calls)::

    import xaicli
    result = xaicli.explain("model.pt", ["photos/"], methods=["saliency"], output="out/")
"""
from .descriptors import Analysis, AnalysisOutput, Attribution, InputItem, Loader, Method, Metric, MetricContext, Writer
from .hookspecs import hookimpl
from .params import Param

__version__ = "0.1.0"


def explain(*args, **kwargs):
    """Run explanations; see `xaicli.api.explain`."""
    from .api import explain as _explain

    return _explain(*args, **kwargs)


def evaluate(*args, **kwargs):
    """Score explanation methods with metrics; see `xaicli.api.evaluate`."""
    from .api import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


def run_file(*args, **kwargs):
    """Run a YAML recipe; see `xaicli.api.run_file`."""
    from .api import run_file as _run_file

    return _run_file(*args, **kwargs)


__all__ = [
    "Analysis", "AnalysisOutput", "Attribution", "InputItem", "Loader", "Method", "Metric", "MetricContext", "Param", "Writer",
    "evaluate", "explain", "hookimpl", "run_file", "__version__",
]
