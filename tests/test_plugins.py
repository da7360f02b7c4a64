"""The plugin system: built-ins come through the entry-point group, a third-party package adds a method."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from xaicli.errors import UsageError
from xaicli.registry import create_registry

XAI = [sys.executable, "-m", "xaicli.cli"]


def test_builtins_are_found_through_the_entry_point_group():
    registry = create_registry()
    origin = registry.origins[("method", "occlusion")]
    assert origin.module == "xaicli_plugins.methods.occlusion"
    assert origin.distribution == "xaicli"
    assert {"saliency", "gradient_x_input", "occlusion"} <= set(registry.plugins["method"])


def test_unknown_names_get_a_suggestion():
    registry = create_registry()
    with pytest.raises(UsageError, match=r"unknown method 'saliancy' \(did you mean 'saliency'\?\)"):
        registry.method("saliancy")
    with pytest.raises(UsageError, match="did you mean 'occlusion'"):
        registry.find("oclusion")


def test_a_name_registered_twice_is_refused():
    import types

    from xaicli import Method, hookimpl

    clash = types.ModuleType("clash")
    clash.xai_methods = hookimpl(lambda: [Method("saliency", "another saliency", lambda *a, **k: None)])
    with pytest.raises(UsageError, match="two plugins register the method 'saliency'"):
        create_registry(extra=[clash])


PLUGIN = '''
"""A third-party method: the sign of the input gradient."""
import torch
from xaicli import Attribution, Method, Param, hookimpl
from xaicli.model import input_gradient


def gradient_sign(model, x, target, rng, scale=1.0):
    grad, _ = input_gradient(model, x, target)
    return Attribution(torch.sign(grad) * scale)


@hookimpl
def xai_methods():
    return [Method("gradient_sign", "sign of the input gradient", gradient_sign,
                   (Param("scale", float, 1.0, "multiplier"),))]
'''


@pytest.fixture(scope="module")
def third_party(tmp_path_factory) -> Path:
    """Build and install (into a target folder) a real plugin package with an `xaicli` entry point."""
    root = tmp_path_factory.mktemp("plugin")
    src = root / "src"
    (src / "xai_gradsign").mkdir(parents=True)
    (src / "xai_gradsign" / "__init__.py").write_text(PLUGIN)
    (src / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "xai-gradsign"
        version = "1.2.3"
        [project.entry-points.xaicli]
        gradsign = "xai_gradsign"
        [tool.setuptools]
        packages = ["xai_gradsign"]
    '''))
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, capture_output=True)
    assert list(site.glob("xai_gradsign-1.2.3.dist-info/entry_points.txt"))
    return site


def _env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "200"}


def test_third_party_plugin_is_listed_and_runs(third_party, digits, tmp_path):
    listed = subprocess.run([*XAI, "plugins"], env=_env(third_party), capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert "gradient_sign" in listed.stdout and "xai-gradsign 1.2.3" in listed.stdout
    shown = subprocess.run([*XAI, "plugins", "show", "gradient_sign"], env=_env(third_party), capture_output=True, text=True)
    assert "scale" in shown.stdout and "float" in shown.stdout

    out = tmp_path / "out"
    run = subprocess.run([*XAI, "explain", str(digits.torchscript), str(digits.images), "-m", "gradient_sign",
                          "--set", "methods.gradient_sign.scale=2.5", "-o", str(out), "--quiet"],
                         env=_env(third_party), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    arrays = sorted((out / "arrays" / "gradient_sign").rglob("*.npz"))
    assert len(arrays) == len(list(digits.images.rglob("*.png")))
    with np.load(arrays[0], allow_pickle=False) as npz:
        assert set(np.unique(npz["relevance"])) <= {-2.5, 0.0, 2.5}
        assert str(npz["method"]) == "gradient_sign"


def test_plugins_show_prints_parameters():
    shown = subprocess.run([*XAI, "plugins", "show", "occlusion"], capture_output=True, text=True,
                           env={**os.environ, "COLUMNS": "200"})
    assert shown.returncode == 0
    for text in ("window", "stride", "baseline", "max_batch", "int | list", "16"):
        assert text in shown.stdout
    missing = subprocess.run([*XAI, "plugins", "show", "oclusion"], capture_output=True, text=True)
    assert missing.returncode == 2
    assert "did you mean 'occlusion'" in missing.stderr
    assert "Traceback" not in missing.stderr
