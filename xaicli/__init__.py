"""xai: batch explanations for neural networks.

Python API (what the CLI calls)::

    import xaicli
    result = xaicli.explain("model.pt", ["photos/"], methods=["saliency"], output="out/")
"""
from .descriptors import Attribution, InputItem, Loader, Method, Metric, MetricContext, Writer
from .hookspecs import hookimpl
from .params import Param

__version__ = "0.1.0"


def explain(*args, **kwargs):
    """Run explanations; see `xaicli.run.explain`."""
    from .run import explain as _explain

    return _explain(*args, **kwargs)


__all__ = [
    "Attribution", "InputItem", "Loader", "Method", "Metric", "MetricContext", "Param", "Writer",
    "explain", "hookimpl", "__version__",
]
