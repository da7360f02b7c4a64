"""Hostile recipes, --set values and plugin parameters: exit code 2 with the key and line, fast, no traceback.

Each class of issue 10's recipe findings runs through the real CLI in-process; the fuzz corpus of
tests/fuzzing.py runs through `load_recipe` with the installed plugins. Times are CPU seconds of
this process (wall time on a shared machine is noise) with a generous bound (5 s): only a hang
or an unbounded expansion fails it; the validations take well under a second.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fuzzing import alias_bomb, fuzz_recipes
from xaicli.cli import app
from xaicli.errors import UsageError
from xaicli.engines import check_methods
from xaicli.plan import make_plan
from xaicli.recipe import MAX_DEPTH, RecipeError, load_recipe
from xaicli.registry import default_registry

ROOT = Path(__file__).resolve().parents[1]
SLOW = 5.0  # seconds: far above the measured times, so that only a hang fails


@pytest.fixture(scope="module")
def registry():
    return default_registry()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder laid out as recipes/quickstart.yaml expects: demo/ (the repository's model and images), recipes/."""
    shutil.copytree(ROOT / "demo", tmp_path / "demo", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (tmp_path / "recipes").mkdir()
    return tmp_path


def cli(*args: str) -> tuple[int, str, float]:
    """(exit code, output, CPU seconds) of `xai ARGS`; an exception escaping the CLI fails the test."""
    start = time.process_time()
    result = CliRunner().invoke(app, list(args))
    seconds = time.process_time() - start
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"xai {' '.join(args)[:200]} raised {result.exception!r}") from result.exception
    return result.exit_code, result.output, seconds


def assert_usage_error(code: int, output: str, seconds: float, *fragments: str) -> None:
    assert code == 2, output[-2000:]
    assert "Traceback" not in output and "╭" not in output
    for fragment in fragments:
        assert fragment in output, (fragment, output[-2000:])
    assert seconds < SLOW


HEAD = "model: ../demo/digits.pt\ninputs: [../demo/images/]\noutput: ../out/\n"


def bomb(width: int, depth: int) -> str:
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join(lines) + "\n"


def indented(block: str) -> str:
    return "".join(f"  {line}\n" for line in block.splitlines())


CASES = {  # name: (recipe text, fragments the message must hold: key and file:line)
    "bomb_top_9x9": (HEAD + bomb(9, 9), ["a4.", "YAML aliases repeat", ".yaml:8:"]),
    "bomb_top_20x10": (HEAD + bomb(20, 10), ["a3.", "alias bomb", ".yaml:7:"]),
    "bomb_in_methods": (HEAD + "anchors:\n" + indented(bomb(9, 9)) + "methods:\n  saliency: *a8\n",
                        ["anchors.a4.", "alias bomb"]),
    "bomb_in_options": (HEAD + "anchors:\n" + indented(bomb(9, 9)) + "methods:\n  occlusion: {window: *a8}\n",
                        ["alias bomb", ".yaml:"]),
    "deep_map_500": (HEAD + "methods: " + "{a: " * 500 + "1" + "}" * 500 + "\n",
                     ["methods.a.a.a", f"nested deeper than {MAX_DEPTH} levels", ".yaml:4:"]),
    "deep_map_50000": (HEAD + "methods: " + "{a: " * 50000 + "1" + "}" * 50000 + "\n", ["methods", ".yaml:4:"]),
    "deep_list_500": (HEAD + "inputs: " + "[" * 500 + "]" * 500 + "\n", ["inputs.0.0", ".yaml:4:"]),
    "deep_list_50000": (HEAD + "inputs: " + "[" * 50000 + "]" * 50000 + "\n", ["inputs", ".yaml:4:"]),
    "deep_block_map_500": (HEAD + "preprocess:\n" + "".join(" " * (i + 1) + "a:\n" for i in range(500)),
                           ["preprocess.a.a.a", "nested deeper", ".yaml:68:"]),
    "deep_block_list_500": (HEAD + "methods:\n" + "".join(" " * (i + 1) + "-\n" for i in range(500)),
                            ["methods.0.0", "nested deeper", ".yaml:68:"]),
    "preprocess_list": (HEAD + "preprocess: [1, 2]\n", ["preprocess", "expected dict", ".yaml:4:"]),
    "preprocess_size_text": (HEAD + "preprocess: {size: big, mean: {a: 1}}\n",
                             ["preprocess.size", "preprocess.mean", ".yaml:4:"]),
    "preprocess_nan": (HEAD + "preprocess: {crop_pct: .nan, std: [.inf]}\n", ["preprocess.crop_pct", "finite"]),
    "output_list": (HEAD.replace("output: ../out/", "output: [a, b]"), ["output", "expected str", ".yaml:3:"]),
    "output_mapping": (HEAD.replace("output: ../out/", "output: {a: 1}"), ["output", ".yaml:3:"]),
    "huge_size": (HEAD + "preprocess: {size: 99999999}\n", ["preprocess.size", "<= 4096", ".yaml:4:"]),
    "huge_size_pair": (HEAD + "preprocess: {size: [32, 99999999]}\n", ["preprocess.size", "item 1", ".yaml:4:"]),
    "huge_channels": (HEAD + "preprocess: {channels: 100000}\n", ["preprocess.channels", "one of 1, 3"]),
    "empty_output": (HEAD.replace("output: ../out/", 'output: ""'), ["output", "empty", ".yaml:3:"]),
    "window_0": (HEAD + "methods:\n  occlusion: {window: 0}\n", ["methods.occlusion.window", ">= 1", ".yaml:5:"]),
    "window_minus_8": (HEAD + "methods:\n  occlusion: {window: [8, -8], stride: 0}\n",
                       ["methods.occlusion.window", "methods.occlusion.stride", ".yaml:5:"]),
    "unknown_keys_20000": (HEAD + "".join(f"unknown_key_{i}: {i}\n" for i in range(20000)),
                           ["unknown_key_0: unknown key", ".yaml:4:", "and 19980 more problems"]),
    "tags": (HEAD + "methods: !!set {saliency}\nseed: !!python/object/apply:os.system [ls]\n",
             ["methods: unsupported YAML tag", ".yaml:4:", "seed: unsupported YAML tag", ".yaml:5:"]),
    "bad_date_and_huge_int": (HEAD + "seed: 2001-02-30\nworkers: " + "9" * 5000 + "\n", ["seed", "workers", ".yaml:5:"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_recipe_exits_2_with_key_and_line(name, project, registry):
    text, fragments = CASES[name]
    path = project / "recipes" / f"{name}.yaml"
    path.write_text(text)
    code, output, seconds = cli("run", str(path), "-q")
    assert_usage_error(code, output, seconds, str(path), *fragments)


@pytest.mark.parametrize("raw, fragment", [
    ("\ufeff".encode() + b"\x00" + HEAD.encode(), "NUL bytes"),
    (HEAD.encode("utf-16"), "UTF-16 text"),
    (HEAD.encode("utf-32"), "UTF-32 text"),
    (b"model: x\n\xff\xfe junk: \xc3\x28\n", "not UTF-8 text"),
    (bytes(range(256)) * 4, "NUL bytes"),
    (b"\x89PNG\r\n\x1a\n" + b"\x01" * 64, "not UTF-8 text"),
    (b"model: x\ninputs: [\x01\x02]\n", "invalid YAML"),
], ids=["bom_nul", "utf16", "utf32", "invalid_utf8", "binary", "png", "control"])
def test_encodings_and_binary_exit_2(raw, fragment, project, registry):
    path = project / "recipes" / "junk.yaml"
    path.write_bytes(raw)
    assert_usage_error(*cli("run", str(path), "-q"), str(path), fragment)


def test_a_utf8_bom_is_accepted(project):
    plain, bom = project / "recipes" / "plain.yaml", project / "recipes" / "bom.yaml"
    plain.write_text(HEAD)
    bom.write_bytes(b"\xef\xbb\xbf" + HEAD.encode())
    assert load_recipe(bom) == load_recipe(plain)


@pytest.mark.parametrize("value, fragments", [
    ("[" * 50000, ["methods.occlusion.window", "cannot parse value"]),
    ("[" * 500 + "]" * 500, ["methods.occlusion.window", "nested deeper"]),
    ("[&a [1,1,1,1,1,1,1,1,1], " + ", ".join(f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcde", "bcdef"))
     + "]", ["methods.occlusion.window", "alias bomb"]),
    ("0", ["methods.occlusion.window", ">= 1"]),
    ("-8", ["methods.occlusion.window", ">= 1"]),
    (".nan", ["methods.occlusion.window", "expected int | list"]),
], ids=["deep_50000", "deep_500", "alias_bomb", "zero", "negative", "nan"])
def test_hostile_set_values_exit_2(value, fragments, project, registry):
    code, output, seconds = cli("explain", str(project / "demo" / "digits.pt"), str(project / "demo" / "images"),
                                "-m", "occlusion", "-o", str(project / "out"), "-q",
                                "--set", f"methods.occlusion.window={value}")
    assert_usage_error(code, output, seconds, "--set", *fragments)
    assert not (project / "out").exists()


def test_set_key_nested_beyond_the_depth_bound_exits_2(project, registry):
    key = "methods" + ".a" * 100
    code, output, seconds = cli("explain", str(project / "demo" / "digits.pt"), str(project / "demo" / "images"),
                                "-o", str(project / "out"), "-q", "--set", f"{key}=1")
    assert_usage_error(code, output, seconds, "--set", "expected KEY=VALUE")


def test_weights_that_are_not_a_checkpoint_exit_2_naming_the_file(project, registry):
    code, output, seconds = cli("explain", "timm:resnet18", str(project / "demo" / "images"), "-m", "saliency",
                                "-o", str(project / "out"), "-q", "--set", "model_options.weights=/etc/passwd")
    assert_usage_error(code, output, seconds, "/etc/passwd", "not a checkpoint", "text file")
    assert "list index" not in output


def test_unknown_gradcam_layer_fails_up_front(project, registry, digits):
    code, output, seconds = cli("explain", str(digits.torchscript), str(digits.images),
                                "-m", "gradcam", "-o", str(project / "out"), "-q",
                                "--set", "methods.gradcam.layer=conv9")
    assert_usage_error(code, output, seconds, "no layer 'conv9'", "did you mean")
    assert not (project / "out" / "errors.jsonl").exists()  # not one failure per input


def test_check_methods_names_the_entry_and_line(project, registry, digits):
    path = project / "recipes" / "layers.yaml"
    path.write_text(HEAD.replace("../demo/digits.pt", str(digits.torchscript)) + "methods:\n  saliency: {}\n  cam:\n    method: gradcam\n    layer: conv9\n"
                    "  cam_ok: {method: gradcam}\n  lrp: {record_layers: [nope]}\n")
    recipe = load_recipe(path, registry=registry)
    model = registry.loader_for(recipe.model).load(recipe.model, torch.device("cpu"))
    with pytest.raises(RecipeError) as excinfo:
        check_methods(make_plan(recipe, registry), model)
    got = [(p.key, p.line) for p in excinfo.value.problems]
    assert got == [("methods.cam", 6), ("methods.lrp", 10)]
    assert "did you mean" in excinfo.value.problems[0].message
    assert "record_layers" in excinfo.value.problems[1].message


def test_alias_bombs_of_the_fuzzer_are_bounded(tmp_path, registry):
    import random

    rng = random.Random(7)
    for i in range(12):
        path = tmp_path / f"bomb{i}.yaml"
        path.write_bytes(alias_bomb(rng))
        start = time.process_time()
        with pytest.raises(UsageError, match="alias"):
            load_recipe(path, registry=registry)
        assert time.process_time() - start < SLOW


def test_fuzzed_recipes_load_or_fail_with_a_usage_error(project, registry):
    """320 mutations of quickstart.yaml: each loads or raises UsageError (never another exception)."""
    outcomes = {"loaded": 0, "usage error": 0}
    slowest = 0.0
    for name, raw in fuzz_recipes(seed=0, n=320):
        path = project / "recipes" / f"{name}.yaml"
        path.write_bytes(raw)
        start = time.process_time()
        try:
            load_recipe(path, registry=registry)
            outcomes["loaded"] += 1
        except UsageError as exc:
            assert str(exc).strip(), name
            outcomes["usage error"] += 1
        except Exception as exc:  # noqa: BLE001 - the point of the test
            raise AssertionError(f"{name}: {exc!r}") from exc
        slowest = max(slowest, time.process_time() - start)
    assert outcomes["loaded"] >= 5 and outcomes["usage error"] >= 250, outcomes
    assert slowest < SLOW
