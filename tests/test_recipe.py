"""Recipes: schema problems with key and line, --set overrides, paths, round trip, plugin parameters."""
from __future__ import annotations

import os
import re
import shutil
import textwrap
import types
from pathlib import Path

import pytest
import torch
import yaml

from xaicli import Attribution, Loader, Method, Metric, Param, Writer, hookimpl
from xaicli.recipe import (
    FIELDS, Problem, Recipe, RecipeError, apply_sets, dump_recipe, from_mapping, load_recipe, validate_plugins,
)
from xaicli.registry import create_registry


def write(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems(excinfo: pytest.ExceptionInfo) -> list[tuple[str, int | None, str | None]]:
    return [(p.key, p.line, p.source) for p in excinfo.value.problems]


def _toy_plugin() -> types.ModuleType:
    """A throw-away plugin module: a method with int/float/choices params, a metric needing masks,
    a writer and a loader with options."""
    module = types.ModuleType("recipe_toy_plugin")

    def explain(model, x, target, rng, window=8, noise=0.1, baseline="zero"):
        return Attribution(torch.zeros_like(x))

    @hookimpl
    def xai_methods():
        return [Method("recipetest_occ", "toy", explain, (
            Param("window", int, 8, "window size", low=1),
            Param("noise", float, 0.1, "noise level", low=0.0, high=1.0),
            Param("baseline", str, "zero", "fill value", choices=("zero", "mean")),
        ))]

    @hookimpl
    def xai_metrics():
        score = lambda model, x, target, relevance, ctx: torch.zeros(len(x))  # noqa: E731
        return [Metric("recipetest_pointing", "toy", "localisation", score, True,
                       (Param("tolerance", int, 0, "pixels", low=0),), needs_masks=True)]

    @hookimpl
    def xai_writers():
        return [Writer("recipetest_writer", "toy", lambda ctx, **params: None, (Param("dpi", int, 72, "dots"),))]

    @hookimpl
    def xai_loaders():
        return [Loader("recipetest_loader", "toy", lambda spec: spec.startswith("toy:"), lambda spec, device: None, (
            Param("pretrained", bool, False, "load weights"), Param("weights", str, None, "checkpoint"),
        ))]

    module.xai_methods, module.xai_metrics = xai_methods, xai_metrics
    module.xai_writers, module.xai_loaders = xai_writers, xai_loaders
    return module


@pytest.fixture(scope="module")
def registry():
    """The real gradient methods and local engine plus the toy plugin, without other entry points."""
    from xaicli.engines import local
    from xaicli_plugins.methods import gradient

    return create_registry(extra=[gradient, local, _toy_plugin()], entry_points=False)


# --- schema problems with key and line -------------------------------------------------------

def test_unknown_key_wrong_type_unknown_method_all_reported_with_lines(tmp_path, registry):
    path = write(tmp_path, """
        model: toy:net
        inputs: [photos/]
        batch_size: many
        methds: {}
        methods:
          salency: {abs: true}
        writers: {recipetest_writer: {}}
    """)
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path, registry=registry)
    assert problems(excinfo) == [
        ("batch_size", 3, str(path)), ("methds", 4, str(path)), ("methods.salency", 6, str(path)),
    ]
    text = str(excinfo.value).splitlines()
    assert text[0] == f"{path}:3: batch_size: expected a positive int or auto; got 'many'"
    assert text[1] == f"{path}:4: methds: unknown key (did you mean 'methods'?)"
    assert text[2].startswith(f"{path}:6: methods.salency: unknown method 'salency' (did you mean 'saliency'?)")


def test_problem_text_format():
    problem = Problem("methods.occlusion.window", 7, "expected int, got str 'big'", "recipe.yaml")
    assert str(problem) == "recipe.yaml:7: methods.occlusion.window: expected int, got str 'big'"
    assert str(Problem("window", None, "bad", "--set")) == "--set: window: bad"
    assert str(Problem("inputs", None, "missing", None)) == "inputs: missing"


def test_missing_required_keys_and_nested_type_errors(tmp_path):
    path = write(tmp_path, """
        seed: 1
        device: gpu
        preprocess: {size: [32], interpolation: cubic, std: [0.2, 0]}
        methods:
          saliency: 3
        thresholds:
          pixel_flipping: {maximum: 1}
    """)
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    got = {p.key: (p.line, p.message) for p in excinfo.value.problems}
    assert got["model"] == (None, "missing required key (TorchScript file (.pt/.ts), ONNX file (.onnx) or timm:NAME)")
    assert got["inputs"][0] is None
    assert got["device"][0] == 2 and got["device"][1].startswith("expected auto, cpu, cuda, cuda:N")
    assert got["preprocess.interpolation"][0] == 3 and "bilinear" in got["preprocess.interpolation"][1]
    assert got["methods.saliency"] == (5, "expected a mapping of parameters (or nothing for defaults); got int 3")
    assert got["thresholds.pixel_flipping"][0] == 7
    assert got["thresholds.pixel_flipping.maximum"] == (7, "unknown bound (did you mean 'max'?); use min or max")
    # size and std are checked only once the interpolation choice is fixed: fix it and see them
    path.write_text(path.read_text().replace("cubic", "bicubic"))
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path, ["model=toy:x", "inputs=a"])
    got = {p.key: p.message for p in excinfo.value.problems}
    assert got["preprocess.size"] == "expected 2 values; got 1: [32]"
    assert got["preprocess.std"] == "must be > 0; got [0.2, 0]"


def test_preprocess_and_thresholds_are_checked_together():
    data = {"model": "timm:x", "inputs": "a", "metrics": {"mprt": {}, "sparseness": None},
            "preprocess": {"size": 64, "channels": 3, "mean": [0.5, 0.5]},
            "thresholds": {"mprt/layer3": {"max": 0.9}, "sparseness": {"min": 0.8, "max": 0.2}, "sparsness": {"min": 0}}}
    with pytest.raises(RecipeError) as excinfo:
        from_mapping(data)
    assert [str(p) for p in excinfo.value.problems] == [
        "preprocess.mean: give one value or one per channel (3); got [0.5, 0.5]",
        "thresholds.sparseness: min 0.8 is above max 0.2",
        "thresholds.sparsness: no metric output 'sparsness' under metrics (did you mean 'sparseness'?)",
    ]
    data["preprocess"]["mean"], data["thresholds"] = 0.5, {"mprt/layer3": {"max": 0.9}}
    recipe = from_mapping(data)
    assert recipe.preprocess == {"size": 64, "channels": 3, "mean": 0.5} and recipe.thresholds == {"mprt/layer3": {"max": 0.9}}
    assert recipe.inputs == [os.path.join(os.getcwd(), "a")] and recipe.metrics == {"mprt": {}, "sparseness": {}}


def test_yaml_syntax_error_names_its_line(tmp_path):
    path = write(tmp_path, "model: a.pt\ninputs: [x\nseed: 1\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    (problem,) = excinfo.value.problems
    assert problem.line == 3 and problem.message.startswith("invalid YAML")
    path = write(tmp_path, "model: a.pt\n\tinputs: x\n")
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    assert excinfo.value.problems[0].line == 2


def test_duplicate_keys_name_both_lines(tmp_path):
    path = write(tmp_path, """
        model: a.pt
        inputs: x
        methods:
          saliency: {abs: true}
          saliency: {abs: false}
        seed: 1
        seed: 2
    """)
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    assert [str(p) for p in excinfo.value.problems] == [
        f"{path}:5: methods.saliency: duplicate key (lines 4 and 5); keep one",
        f"{path}:7: seed: duplicate key (lines 6 and 7); keep one",
    ]


@pytest.mark.parametrize("text, message", [
    ("- model: a.pt\n", "got list [{'model': 'a.pt'}]"),
    ("", "got nothing"),
    ("just text\n", "got str 'just text'"),
])
def test_document_must_be_a_mapping(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    assert str(excinfo.value) == f"{path}: a recipe is a mapping of keys (model, inputs, methods, ...); {message}"


def test_non_string_keys_and_python_tags_are_rejected(tmp_path):
    path = write(tmp_path, """
        model: !!python/name:os.system
        inputs: x
        methods: {1: {}}
    """)
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path)
    got = {p.key: (p.line, p.message) for p in excinfo.value.problems}
    assert got["model"][0] == 1 and "could not determine a constructor" in got["model"][1]
    assert got["methods.1"] == (3, "keys must be strings (quote it)")


def test_anchors_and_merge_keys(tmp_path):
    path = write(tmp_path, """
        model: a.pt
        inputs: x
        methods:
          small: &occ {method: occlusion, window: 8, stride: 4}
          large: {<<: *occ, window: 16}
    """)
    recipe = load_recipe(path)
    assert recipe.methods["large"] == {"method": "occlusion", "window": 16, "stride": 4}
    assert recipe.lines["methods.large.window"] == 5


# --- --set overrides ------------------------------------------------------------------------

def test_apply_sets_parses_yaml_values_and_creates_mappings():
    data = {"methods": {"occlusion": {"window": 8}, "saliency": None}, "seed": 0}
    out = apply_sets(data, [
        "methods.occlusion.window=32", "methods.occlusion.noise=0.5", "methods.saliency.abs=true",
        "metrics.pixel_flipping.features_per_step=64", "inputs=[a, b]", "labels=classes.txt", "target=",
        "preprocess.size=[64, 48]", "writers={png: {colormap: coldnhot}}",
    ])
    assert out["methods"] == {"occlusion": {"window": 32, "noise": 0.5}, "saliency": {"abs": True}}
    assert out["metrics"] == {"pixel_flipping": {"features_per_step": 64}}
    assert out["inputs"] == ["a", "b"] and out["labels"] == "classes.txt" and out["target"] is None
    assert out["preprocess"] == {"size": [64, 48]} and out["writers"] == {"png": {"colormap": "coldnhot"}}
    assert data["methods"]["occlusion"] == {"window": 8} and data["methods"]["saliency"] is None  # not mutated


def test_apply_sets_errors_name_the_key():
    with pytest.raises(RecipeError) as excinfo:
        apply_sets({"seed": 0, "inputs": ["a"]}, ["seed.x=1", "inputs.0=b", "no_equals", "methods..x=1", "a=[1,"])
    got = [str(p) for p in excinfo.value.problems]
    assert got[:4] == [
        "--set: seed: cannot set seed.x: seed is int 0, not a mapping",
        "--set: inputs: cannot set inputs.0: inputs is list ['a'], not a mapping",
        "--set: no_equals: expected KEY=VALUE, e.g. methods.occlusion.window=32",
        "--set: methods..x=1: expected KEY=VALUE, e.g. methods.occlusion.window=32",
    ]
    assert got[4].startswith("--set: a: cannot parse value '[1,': ") and len(got) == 5  # libyaml's or PyYAML's words


def test_set_values_are_validated_and_reported_as_from_set(tmp_path):
    path = write(tmp_path, """
        model: a.pt
        inputs: x
        methods:
          saliency: {abs: true}
    """)
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path, ["seed=abc", "methods.saliency={abs: 3}", "metricz.x.y=1"])
    assert [str(p) for p in excinfo.value.problems] == [
        "--set: metricz: unknown key (did you mean 'metrics'?)",
        "--set: seed: expected int, got str 'abc'",
    ]
    recipe = load_recipe(path, ["methods.saliency={abs: false}", "batch_size=4"])
    assert recipe.methods == {"saliency": {"abs": False}} and recipe.batch_size == 4
    assert "methods.saliency.abs" not in recipe.lines and recipe.lines["methods"] == 3


# --- paths ---------------------------------------------------------------------------------

def test_paths_resolve_relative_to_the_recipe_file(tmp_path, monkeypatch):
    path = write(tmp_path / "project" / "recipes", """
        model: ../models/net.pt
        model_options: {weights: ckpt.safetensors, pretrained: false}
        labels: classes.txt
        inputs: [photos/, "shots/*.png", /abs/data]
        output: out
        target: targets.csv
        masks: ~/masks
        from_run: ../runs/one
    """)
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("project/recipes/recipe.yaml", ["output=here", "labels=names.txt"])
    folder = tmp_path / "project" / "recipes"
    assert recipe.model == str(tmp_path / "project" / "models" / "net.pt")
    assert recipe.model_options == {"weights": str(folder / "ckpt.safetensors"), "pretrained": False}
    assert recipe.inputs == [str(folder / "photos"), str(folder / "shots" / "*.png"), "/abs/data"]
    assert recipe.target == str(folder / "targets.csv")
    assert recipe.masks == os.path.join(os.path.expanduser("~"), "masks")
    assert recipe.from_run == str(tmp_path / "project" / "runs" / "one")
    assert recipe.output == str(tmp_path / "here") and recipe.labels == str(tmp_path / "names.txt")  # --set: cwd


def test_model_names_and_class_targets_are_not_paths(tmp_path):
    path = write(tmp_path / "r", "model: timm:resnet18\ninputs: x\ntarget: 3\n")
    recipe = load_recipe(path)
    assert recipe.model == "timm:resnet18" and recipe.target == 3
    assert recipe.output == os.path.join(os.getcwd(), "xai-out")  # a default is relative to the current directory


# --- dump -> load ---------------------------------------------------------------------------

RICH = """
    model: ../models/net.pt
    model_options: {pretrained: false, weights: ckpt.safetensors}
    preprocess: {size: [64, 48], mean: [0.5], std: 0.25, interpolation: bicubic, crop_pct: 0.875, channels: 1}
    labels: classes.txt
    inputs: [photos, "shots/*.png"]
    output: out
    seed: 7
    batch_size: 4
    device: cuda:1
    workers: 2
    target: targets.csv
    overwrite: true
    methods:
      saliency:
      saliency_abs: {method: saliency, abs: true}
    writers: {png: {colormap: coldnhot}, npz: {}}
    metrics:
      pixel_flipping: {features_per_step: 64}
    thresholds:
      pixel_flipping: {max: 0.5, min: 0}
    baseline: ../evals/main
    max_regression: {pixel_flipping: 0.05}
    masks: masks
    from_run: "../runs/one"
"""


def test_dump_load_round_trip(tmp_path):
    recipe = load_recipe(write(tmp_path / "a", RICH))
    text = dump_recipe(recipe)
    assert "!!" not in text and "null" not in text
    assert list(yaml.safe_load(text)) == [p.name for p in FIELDS]
    data = yaml.safe_load(text)
    assert data["model"] == "../models/net.pt" and data["inputs"] == ["photos", "shots/*.png"]  # as written
    assert data["methods"]["saliency"] == {} and data["thresholds"] == {"pixel_flipping": {"max": 0.5, "min": 0.0}}
    again = load_recipe(write(tmp_path / "a", text, "again.yaml"))
    assert again == recipe
    assert again.inputs == [str(tmp_path / "a" / "photos"), str(tmp_path / "a" / "shots" / "*.png")]


def test_saved_recipe_is_portable(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    recipe = from_mapping({"model": "models/net.pt", "inputs": ["photos"], "methods": {"saliency": None}})
    text = dump_recipe(recipe, project / "runs")  # what `--save-recipe runs/recipe.yaml` writes
    assert yaml.safe_load(text)["inputs"] == ["../photos"] and yaml.safe_load(text)["output"] == "../xai-out"
    assert load_recipe(write(project / "runs", text)) == recipe
    shutil.copytree(project, tmp_path / "moved")  # the project moves as a whole
    assert load_recipe(tmp_path / "moved" / "runs" / "recipe.yaml").inputs == [str(tmp_path / "moved" / "photos")]
    far = from_mapping({"model": "timm:x", "inputs": ["/data/set"]})
    assert yaml.safe_load(dump_recipe(far, tmp_path / "a" / "b"))["inputs"] == ["/data/set"]


def test_recipe_fields_follow_the_schema():
    names = [f for f in Recipe.__dataclass_fields__ if f not in ("source", "lines", "overrides", "resolved")]
    assert names == [p.name for p in FIELDS]


# --- plugins ---------------------------------------------------------------------------------

def test_validate_plugins_with_the_real_registry(tmp_path):
    path = write(tmp_path, """
        model: a.pt
        inputs: x
        methods:
          sal: {method: saliency, abss: true}
          sal_abs: {method: saliency, abs: 1}
          gxi: {method: gradient_x_inputs}
        writers: {}
    """)
    with pytest.raises(RecipeError) as excinfo:
        validate_plugins(load_recipe(path), create_registry())
    got = [str(p) for p in excinfo.value.problems if p.key.startswith("methods")]
    assert got[0] == f"{path}:4: methods.sal.abss: unknown parameter (did you mean 'abs'?)"
    assert got[1] == f"{path}:5: methods.sal_abs.abs: expected bool, got int 1"
    assert got[2].startswith(f"{path}:6: methods.gxi.method: unknown method 'gradient_x_inputs' (did you mean 'gradient_x_input'?)")


def test_validate_plugins_resolves_defaults(tmp_path, registry):
    path = write(tmp_path, """
        model: toy:net
        model_options: {weights: w.safetensors}
        inputs: x
        masks: masks/
        methods:
          saliency:
          occ_big: {method: recipetest_occ, window: 32}
        metrics:
          point: {metric: recipetest_pointing}
        writers: {recipetest_writer: {dpi: 150}}
    """)
    resolved = validate_plugins(load_recipe(path), registry)
    assert resolved == {
        "methods": {"saliency": {"method": "saliency", "abs": False},
                    "occ_big": {"method": "recipetest_occ", "window": 32, "noise": 0.1, "baseline": "zero"}},
        "metrics": {"point": {"metric": "recipetest_pointing", "tolerance": 0}},
        "writers": {"recipetest_writer": {"dpi": 150}},
        "model_options": {"pretrained": False, "weights": str(tmp_path / "w.safetensors")},
    }


def test_plugin_parameter_values_are_checked(tmp_path, registry):
    path = write(tmp_path, """
        model: toy:net
        model_options: {pretrained: yes please}
        inputs: x
        methods:
          occ: {method: recipetest_occ, window: 0, noise: 2, baseline: blur}
        metrics:
          recipetest_pointing: {tolerance: 1.5}
        writers: {recipetest_writer: {}, pngg: {}}
    """)
    with pytest.raises(RecipeError) as excinfo:
        load_recipe(path, ["methods.occ.window=big"], registry=registry)
    assert [str(p) for p in excinfo.value.problems] == [
        f"{path}:2: model_options.pretrained: expected bool, got str 'yes please'",
        f"{path}:5: methods.occ.noise: must be <= 1.0; got 2.0",
        f"{path}:5: methods.occ.baseline: must be one of zero, mean; got 'blur'",
        f"{path}:7: metrics.recipetest_pointing: metric 'recipetest_pointing' needs ground-truth masks: "
        "set `masks:` to a folder of masks",
        f"{path}:7: metrics.recipetest_pointing.tolerance: expected int, got float 1.5",
        f"{path}:8: writers.pngg: " + str(excinfo.value.problems[5].message),
        "--set: methods.occ.window: expected int, got str 'big'",
    ]
    assert excinfo.value.problems[5].message.startswith("unknown writer 'pngg'")


def test_unknown_model_spec_is_reported_on_the_model_line(tmp_path, registry):
    path = write(tmp_path, "inputs: x\nmodel: weird.bin\nwriters: {}\n")
    with pytest.raises(RecipeError) as excinfo:
        validate_plugins(load_recipe(path), registry)
    (problem,) = excinfo.value.problems
    assert (problem.key, problem.line) == ("model", 2) and "no model loader handles" in problem.message


def test_example_recipe_points_at_the_demo_files(tmp_path, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)  # any working directory
    recipe = load_recipe(root / "recipes" / "two_methods.yaml")
    assert Path(recipe.model) == root / "demo" / "digits.pt" and Path(recipe.model).is_file()
    assert recipe.inputs == [str(root / "demo" / "images")] and recipe.output == str(root / "out" / "two_methods")
    assert recipe.methods == {"saliency_abs": {"method": "saliency", "abs": True}, "gradient_x_input": {}}


def test_param_checks_list_items_finiteness_int64_and_nul():
    window = Param("window", (int, list), 16, "n or [h, w]", low=1, high=4096, length=2)
    assert window.check(8) == 8 and window.check([8, 4]) == [8, 4]
    for value, message in (([8, -8], "item 1 of [8, -8]: must be >= 1; got -8"), ([8], "expected 2 values; got 1: [8]"),
                           ([8, "a"], "item 1 of [8, 'a']: expected int, got str 'a'"), (0, "must be >= 1; got 0")):
        with pytest.raises(ValueError, match=re.escape(message)):
            window.check(value)
    with pytest.raises(ValueError, match="finite"):
        Param("x", float, 0.0, "").check(float("nan"))
    with pytest.raises(ValueError, match="2\\*\\*63"):
        Param("seed", int, 0, "").check(10**30)
    with pytest.raises(ValueError, match="must be between .* got <int of 13288 bits>"):
        Param("seed", float, 0.0, "").check(10**4000)  # beyond float range: no OverflowError
    with pytest.raises(ValueError, match="NUL"):
        Param("layer", str, None, "").check("a\0b")
    assert Param("p", list, [1], "", item=float, low=0, high=100).check([1, 2.5]) == [1.0, 2.5]
