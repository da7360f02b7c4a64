"""Part 2: fuzzed recipes through `xai run`; each must end with exit 2 (0/1 when it happens to be
valid) within its time limit, without a traceback, within its memory limit.

Recipes come from `tests/fuzzing.py` (`fuzz_recipes(seed, n)`: mutations of the quickstart recipe)
when that module exists, plus the classes of the generator below that it lacks (SUPPLEMENT);
without it, from every class of the generator: alias bombs (at the top level, in methods, options,
inputs, writers, preprocess, merge keys), recursive aliases, nesting 500-50,000 deep (flow maps,
flow lists, compact block lists, indented block maps), a wrong type for every top-level key, wrong
nested values, unknown keys (up to 20,000), YAML tags (including python/object), binary junk,
BOMs, UTF-16/32, huge numbers, odd documents and hostile paths, plus random byte mutations.

Each recipe runs in a warm child (see launch.py) with RLIMIT_AS 4 GiB above the parent's size.
Generated cases that are invalid by construction must exit 2 (the issue: refused up front, not per
input); the valid base must exit 0; the rest may be valid or not (0/1/2), as may every external one.
Checks beyond the exit: exit 2 prints an `error:` line; outputs of a recipe that ran are finite;
nothing is written into the recipe's own folder (when its outputs point elsewhere); no tag runs code.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .launch import Job, Task, run
from .report import Tally, npz_problem, tree

TIMEOUT = 60.0  # wall seconds: catches a blocked hang
CPU_TIMEOUT = 10.0  # CPU seconds: catches a busy hang (an alias bomb) even on a loaded machine
ADDRESS_SPACE = 4 << 30
SLOW = 2.0  # seconds: reported (not failed) above this; the machine is shared, timings are noisy
SUPPLEMENT = ("valid", "recursive", "nested", "tag", "doc", "path", "huge")  # classes tests/fuzzing.py lacks
TOP_KEYS = ("model", "model_options", "preprocess", "labels", "inputs", "output", "seed", "batch_size", "device",
            "engine", "workers", "target", "overwrite", "methods", "writers", "metrics", "thresholds", "masks",
            "from_run")
WRONG = ("42", "-1", "3.5", '"text"', "[1, 2]", "{a: 1}", "null", '""')
NUMERIC = ("seed", "batch_size", "workers", "target")
PWNED = "PWNED"
# Exit codes by case: the valid base runs (0); these classes and names may be valid or not
# (0/1/2); every other generated case is invalid and must be refused up front (2).
VALID = {"valid": (0,), "valid_crlf": (0,), "valid_bom": (0, 2)}
LENIENT_CLASSES = ("type", "missing", "enc", "huge", "mutated")
LENIENT = {"nested_size_list1", "nested_window_huge", "nested_window_float", "nested_window_str", "nested_window_null",
           "nested_writers_empty", "tag_str_int_seed", "tag_int_hex_seed", "junk_appended", "doc_two", "doc_duplicate",
           "doc_many_inputs", "path_inputs_null", "path_masks_file"}
STRICT = {"enc_bad_utf8_value", "enc_surrogate", "enc_tabs", "huge_target_neg", "huge_size_huge_list"}


def expected(name: str) -> tuple[int, ...]:
    if name in VALID:
        return VALID[name]
    if name in STRICT:
        return (2,)
    if name in LENIENT or name.split("_")[0] in LENIENT_CLASSES:
        return (0, 1, 2)
    return (2,)


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    confined: bool = True  # the recipe's outputs (if any) go outside its folder
    expect: tuple[int, ...] = (0, 1, 2)  # exit codes that pass
    project: bool = False  # runs as recipes/recipe.yaml beside demo/digits.pt and demo/images/ (quickstart's paths)


@dataclass(frozen=True)
class Paths:
    model: Path
    inputs: Path
    out: Path  # each case writes under out/<name>


def cases(seed: int, n: int, root: Path, paths: Paths, quick: bool = False) -> list[Case]:
    """At least `n` recipes (about `n` when quick).

    With tests/fuzzing.py: its `fuzz_recipes(seed, n)` (mutations of recipes/quickstart.yaml, run in
    a copy of the project layout it expects) plus the classes of this generator it lacks (SUPPLEMENT);
    without it, every class of this generator.
    """
    external = root / "tests" / "fuzzing.py"
    if not external.is_file():
        return generate(seed, n, paths, sample=quick)
    spec = importlib.util.spec_from_file_location("xai_tests_fuzzing", external)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fuzzed = [Case(f"ext_{_safe(name)}", data, confined=False, project=True) for name, data in module.fuzz_recipes(seed, n)]
    own = generate(seed, 0, paths, classes=SUPPLEMENT)
    if quick:
        own = random.Random(seed).sample(own, max(1, n // 4))
    return fuzzed + own


# -- the generator ----------------------------------------------------------------------------------

class Doc:
    """A recipe as top-level `key: raw YAML value` lines over a valid base (absolute paths)."""

    def __init__(self, paths: Paths, name: str):
        self.values = {
            "model": json.dumps(str(paths.model)),
            "inputs": f"[{json.dumps(str(paths.inputs))}]",
            "output": json.dumps(str(paths.out / name)),
            "seed": "0",
            "batch_size": "2",
            "methods": "{saliency: {}, occlusion: {window: 8, stride: 8}}",
        }

    def text(self, prefix: str = "", suffix: str = "", **values: str | None) -> str:
        merged = {**self.values, **values}
        body = "".join(f"{k}: {v}\n" for k, v in merged.items() if v is not None)
        return prefix + body + suffix


def bomb_list(width: int, depth: int) -> str:
    """A flow list whose last element expands to width**depth strings: [&a0 [..], &a1 [*a0, ..], .., *aN]."""
    levels = [f"&a0 [{', '.join(['lol'] * width)}]"]
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
    return f"[{', '.join(levels)}, *a{depth - 1}]"


def bomb_top(width: int, depth: int) -> str:
    """Billion laughs as top-level keys."""
    lines = [f"lol0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"lol{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join(lines) + f"\nbomb: *a{depth - 1}\n"


def deep(kind: str, depth: int) -> str:
    """A value nested `depth` levels deep, as flow text (one line) or block text (starting on a new line)."""
    if kind == "flow_map":
        return "{a: " * depth + "1" + "}" * depth
    if kind == "flow_list":
        return "[" * depth + "1" + "]" * depth
    if kind == "block_list":
        return "\n  " + "- " * depth + "1"
    return "".join("\n" + " " * (i + 2) + "a:" for i in range(depth)) + " 1"  # block_map


def generate(seed: int, n: int, paths: Paths, sample: bool = False, classes: tuple[str, ...] = ()) -> list[Case]:
    """Every class of hostile recipe and 20+ random mutations of the base recipe, at least `n` in all;
    with `sample`, a seeded sample of `n` of them (the quick run); with `classes`, only those classes."""
    rng = random.Random(seed)
    out: list[Case] = []

    def add(name: str, build, confined: bool = True) -> None:
        doc = Doc(paths, name)
        data = build(doc)
        out.append(Case(name, data.encode() if isinstance(data, str) else data, confined, expected(name)))

    add("valid", lambda d: d.text())
    add("valid_bom", lambda d: "\ufeff" + d.text())
    add("valid_crlf", lambda d: d.text().replace("\n", "\r\n"))
    for width, depth in ((9, 9), (20, 10)):
        tag = f"{width}x{depth}"
        b = bomb_list(width, depth)
        add(f"bomb_top_{tag}", lambda d, w=width, k=depth: d.text(suffix=bomb_top(w, k)))
        add(f"bomb_method_{tag}", lambda d, b=b: d.text(methods=f"{{saliency: {{window: {b}}}}}"))
        add(f"bomb_option_{tag}", lambda d, b=b: d.text(methods=f"{{occlusion: {{window: 8, stride: {b}}}}}"))
        add(f"bomb_methods_{tag}", lambda d, b=b: d.text(methods=b))
        add(f"bomb_model_options_{tag}", lambda d, b=b: d.text(model_options=f"{{weights: {b}}}"))
        add(f"bomb_inputs_{tag}", lambda d, b=b: d.text(inputs=b))
        add(f"bomb_writers_{tag}", lambda d, b=b: d.text(writers=f"{{png: {{colormap: {b}}}}}"))
        add(f"bomb_preprocess_{tag}", lambda d, b=b: d.text(preprocess=f"{{mean: {b}}}"))
    add("bomb_merge", lambda d: d.text(
        prefix="m0: &m0 {" + ", ".join(f"k{i}: 1" for i in range(9)) + "}\n"
        + "".join(f"m{i}: &m{i} {{" + ", ".join(f"k{j}: *m{i - 1}" for j in range(9)) + "}\n" for i in range(1, 9)),
        methods="{saliency: {<<: *m8}}"))
    add("recursive_list", lambda d: d.text(inputs="&r [*r]"))
    add("recursive_map", lambda d: d.text(model_options="&r {self: *r}"))
    add("recursive_methods", lambda d: d.text(methods="&r {saliency: {window: *r}}"))
    for kind in ("flow_map", "flow_list", "block_list"):
        for depth in (500, 1000, 5000, 20000, 50000):
            add(f"deep_{kind}_{depth}_top", lambda d, k=kind, n=depth: d.text(suffix=f"deep: {deep(k, n)}\n"))
            if kind != "block_list":
                add(f"deep_{kind}_{depth}_option", lambda d, k=kind, n=depth: d.text(
                    methods=f"{{occlusion: {{window: {deep(k, n)}}}}}"))
            else:
                add(f"deep_{kind}_{depth}_options", lambda d, k=kind, n=depth: d.text(model_options=deep(k, n)))
    for depth in (500, 1000, 2000):
        add(f"deep_block_map_{depth}", lambda d, n=depth: d.text(suffix=f"deep:{deep('block_map', n)}\n"))
    for key in TOP_KEYS:
        for i, value in enumerate(WRONG + ((".nan", "1e400", ".inf") if key in NUMERIC else ())):
            confined = key != "output" or value in ('""', "null", "{a: 1}", "[1, 2]")
            add(f"type_{key}_{i}", lambda d, k=key, v=value: d.text(**{k: v}), confined)
        add(f"missing_{key}", lambda d, k=key: d.text(**{k: None}))
    nested = {
        "size_0": ("preprocess", "{size: 0}"), "size_neg": ("preprocess", "{size: -1}"),
        "size_huge": ("preprocess", "{size: 99999999}"), "size_list1": ("preprocess", "{size: [32]}"),
        "size_list3": ("preprocess", "{size: [32, 32, 32]}"), "size_str": ("preprocess", "{size: big}"),
        "size_float": ("preprocess", "{size: 1e10}"), "mean_str": ("preprocess", "{mean: x}"),
        "mean_empty": ("preprocess", "{mean: []}"), "mean_4": ("preprocess", "{mean: [1, 2, 3, 4]}"),
        "std_0": ("preprocess", "{std: 0}"), "crop_0": ("preprocess", "{crop_pct: 0}"),
        "crop_2": ("preprocess", "{crop_pct: 2}"), "crop_nan": ("preprocess", "{crop_pct: .nan}"),
        "channels_0": ("preprocess", "{channels: 0}"), "channels_2": ("preprocess", "{channels: 2}"),
        "channels_huge": ("preprocess", "{channels: 1000}"), "interp": ("preprocess", "{interpolation: sinc}"),
        "window_0": ("methods", "{occlusion: {window: 0}}"), "window_neg": ("methods", "{occlusion: {window: -8}}"),
        "window_huge": ("methods", "{occlusion: {window: 1000000000}}"),
        "window_float": ("methods", "{occlusion: {window: 1.5}}"), "window_str": ("methods", "{occlusion: {window: '8'}}"),
        "window_null": ("methods", "{occlusion: {window: null}}"), "window_nan": ("methods", "{occlusion: {window: .nan}}"),
        "stride_0": ("methods", "{occlusion: {window: 8, stride: 0}}"),
        "stride_neg": ("methods", "{occlusion: {window: 8, stride: -1}}"),
        "method_scalar": ("methods", "{saliency: 5}"), "method_list": ("methods", "{saliency: [1]}"),
        "method_empty_name": ("methods", "{'': {}}"), "method_bad_ref": ("methods", "{x: {method: 3}}"),
        "method_unknown_ref": ("methods", "{x: {method: nope}}"), "methods_list": ("methods", "[saliency]"),
        "gradcam_layer": ("methods", "{gradcam: {layer: no.such.layer}}"),
        "lrp_composite": ("methods", "{lrp: {composite: Nope}}"),
        "writer_colormap": ("writers", "{png: {colormap: nope}}"), "writer_scalar": ("writers", "{png: 3}"),
        "writer_unknown": ("writers", "{pdf: {}}"), "writers_empty": ("writers", "{}"),
        "metric_zero": ("metrics", "{pixel_flipping: {features_per_step: 0}}"),
        "metric_unknown": ("metrics", "{accuracy: {}}"), "threshold_str": ("thresholds", "{x: {min: a}}"),
        "threshold_list": ("thresholds", "{sparseness: [1]}"), "engine_unknown": ("engine", "{name: nope}"),
        "engine_ray_bad": ("engine", "{name: ray, address: 5}"), "device_bad": ("device", "cuda:99"),
        "device_junk": ("device", "'cpu,,cpu'"),
    }
    for name, (key, value) in nested.items():
        add(f"nested_{name}", lambda d, k=key, v=value: d.text(**{k: v}))
    add("unknown_key", lambda d: d.text(suffix="batch_sise: 4\n"))
    add("unknown_100", lambda d: d.text(suffix="".join(f"k{i}: {i}\n" for i in range(100))))
    add("unknown_20000", lambda d: d.text(suffix="".join(f"key{i}: {i}\n" for i in range(20000))))
    add("unknown_option", lambda d: d.text(methods="{occlusion: {windw: 8}}"))
    add("unknown_options_20000", lambda d: d.text(
        methods="{saliency: {" + ", ".join(f"p{i}: {i}" for i in range(20000)) + "}}"))
    add("unknown_method", lambda d: d.text(methods="{saliencyy: {}}"))
    add("unknown_methods_1000", lambda d: d.text(methods="{" + ", ".join(f"m{i}: {{}}" for i in range(1000)) + "}"))
    tags = {
        "python_apply": f"!!python/object/apply:os.system [\"touch {PWNED}\"]",
        "python_name": "!!python/name:os.system",
        "python_new": f"!!python/object/new:subprocess.check_output [[touch, {PWNED}]]",
        "binary": "!!binary aGVsbG8=", "set": "!!set {a, b}", "omap": "!!omap [a: 1, b: 2]",
        "timestamp": "2001-12-14t21:59:43.10-05:00", "custom": "!custom 3", "str_int": "!!str 3",
        "float_nan": "!!float .nan", "int_hex": "!!int '0x10'", "bool_str": "!!bool 'maybe'",
    }
    for name, value in tags.items():
        add(f"tag_{name}_seed", lambda d, v=value: d.text(seed=v))
    add("tag_python_model", lambda d: d.text(model=tags["python_apply"]))
    add("tag_python_top", lambda d: d.text(prefix=f"? {tags['python_apply']}\n: 1\n"))
    for i in range(10):
        add(f"junk_binary_{i}", lambda d: bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096))))
    for i in range(5):
        add(f"junk_text_{i}", lambda d: "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randint(1, 2048))))
    add("junk_nul", lambda d: b"\x00" * 1000)
    add("junk_appended", lambda d: d.text().encode() + bytes(rng.randrange(256) for _ in range(200)))
    add("junk_nul_inside", lambda d: d.text().replace("seed: 0", "seed: 0\x00"))
    add("junk_control", lambda d: d.text().replace("seed: 0", "seed: \x1b[31m0\x07"))
    for name, codec in (("utf16le", "utf-16-le"), ("utf16be", "utf-16-be"), ("utf16", "utf-16"), ("utf32", "utf-32")):
        add(f"enc_{name}", lambda d, c=codec: (("\ufeff" if c.endswith(("le", "be")) else "") + d.text()).encode(c))
    add("enc_utf16_nobom", lambda d: d.text().encode("utf-16-le"))
    add("enc_latin1", lambda d: d.text(methods="{saliency: {}}", suffix="# caf\xe9\n").encode("latin-1"))
    add("enc_bad_utf8_value", lambda d: d.text().encode().replace(b"seed: 0", b"seed: \xff\xfe"))
    add("enc_surrogate", lambda d: d.text(seed='"\\ud800"'))
    add("enc_cr_only", lambda d: d.text().replace("\n", "\r"))
    add("enc_tabs", lambda d: d.text(suffix="methods2:\n\tsaliency: {}\n"))
    huge = {
        "seed_big": ("seed", str(10**100)), "seed_neg_big": ("seed", str(-(10**100))), "seed_2_64": ("seed", str(2**64)),
        "seed_inf": ("seed", "1e309"), "batch_big": ("batch_size", str(10**20)), "workers_big": ("workers", str(10**9)),
        "target_big": ("target", str(10**40)), "target_neg": ("target", "-5"),
        "window_big": ("methods", f"{{occlusion: {{window: {10**30}}}}}"),
        "stride_big": ("methods", f"{{occlusion: {{window: 8, stride: {10**30}}}}}"),
        "size_huge_list": ("preprocess", "{size: [99999999, 99999999]}"),
    }
    for name, (key, value) in huge.items():
        add(f"huge_{name}", lambda d, k=key, v=value: d.text(**{k: v}))
    add("doc_empty", lambda d: b"")
    add("doc_marker", lambda d: "---\n")
    add("doc_end", lambda d: "...\n")
    add("doc_two", lambda d: d.text() + "---\n" + d.text())
    add("doc_list", lambda d: "- model: x\n- inputs: y\n")
    add("doc_scalar", lambda d: "just a string\n")
    add("doc_null", lambda d: "~\n")
    add("doc_comments", lambda d: "# nothing here\n# at all\n")
    add("doc_duplicate", lambda d: d.text() + "seed: 1\nseed: 2\n")
    add("doc_long_value", lambda d: d.text(labels=json.dumps("x" * (1 << 20))))
    add("doc_long_key", lambda d: d.text(suffix="k" * 100_000 + ": 1\n"))
    add("doc_many_inputs", lambda d: d.text(inputs="[" + ", ".join([json.dumps(str(paths.inputs))] * 1000) + "]"))
    hostile = {
        "model_passwd": ("model", "/etc/passwd"), "model_zero": ("model", "/dev/zero"), "model_root": ("model", "/"),
        "model_missing": ("model", "/nonexistent/model.pt"), "model_dir": ("model", json.dumps(str(paths.inputs))),
        "model_scheme": ("model", "'timm:'"), "weights_passwd": ("model_options", "{weights: /etc/passwd}"),
        "weights_zero": ("model_options", "{weights: /dev/zero}"), "labels_zero": ("labels", "/dev/zero"),
        "labels_dir": ("labels", "/etc"), "masks_file": ("masks", "/etc/passwd"), "inputs_null": ("inputs", "[/dev/null]"),
        "inputs_glob": ("inputs", "['/nonexistent/**/*.png']"), "output_proc": ("output", "/proc/xai-stress"),
        "output_null": ("output", "/dev/null"), "output_file": ("output", "/etc/passwd"),
        "output_under_file": ("output", "/etc/passwd/sub"), "target_zero": ("target", "/dev/zero"),
        "from_run_zero": ("from_run", "/dev/zero"),
    }
    for name, (key, value) in hostile.items():
        add(f"path_{name}", lambda d, k=key, v=value: d.text(**{k: v}))
    if classes:
        return [c for c in out if c.name.split("_")[0] in classes]
    while len(out) < n or sum(c.name.startswith("mutated") for c in out) < 20:
        name = f"mutated_{sum(c.name.startswith('mutated') for c in out)}"
        add(name, lambda d: _mutate(d.text().encode(), rng), confined=False)
    if sample and len(out) > n:
        keep = sorted(rng.sample(range(len(out)), n))
        out = [out[i] for i in keep]
    return out


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """The base recipe with a few random bytes flipped, overwritten, inserted or deleted."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(len(buf))
        op = rng.randrange(4)
        if op == 0:
            buf[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[at] = rng.choice(b"{}[]:&*!|>-#%@`'\",?\x00\xff")
        elif op == 2:
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        else:
            del buf[at : at + rng.randint(1, 8)]
    return bytes(buf)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80] or "recipe"


# -- running ----------------------------------------------------------------------------------------

def prepare(work: Path, demo: Path) -> Paths:
    """The base recipe's model (a copy of the demo's) and inputs (two demo digits), and the folder outputs go to."""
    inputs = work / "inputs"
    inputs.mkdir(parents=True)
    for source in sorted((demo / "images").rglob("*.png"))[:2]:
        (inputs / source.name).write_bytes(source.read_bytes())
    model = work / "digits.pt"
    model.write_bytes((demo / "digits.pt").read_bytes())
    return Paths(model, inputs, work / "out")


def tasks(case_list: list[Case], work: Path, paths: Paths, tally: Tally) -> Iterator[Task]:
    for i, case in enumerate(case_list):
        yield task(case, work / "cases" / f"{i:03d}_{case.name}", paths, tally)


def _project(demo: Path, paths: Paths) -> None:
    """demo/digits.pt and demo/images/0/ (the base inputs) as hard links: each case gets its own folders."""
    (demo / "images" / "0").mkdir(parents=True)
    os.link(paths.model, demo / "digits.pt")
    for image in sorted(paths.inputs.iterdir()):
        os.link(image, demo / "images" / "0" / image.name)


def task(case: Case, folder: Path, paths: Paths, tally: Tally) -> Task:
    """`xai run` one recipe in a warm child and check how it ended and what it left."""
    recipe = folder / ("recipes" if case.project else "recipe") / "recipe.yaml"
    recipe.parent.mkdir(parents=True)
    recipe.write_bytes(case.data)
    if case.project:
        _project(folder / "demo", paths)
    job = Job(["run", str(recipe), "--quiet"], folder / "cwd", folder / "log.txt", TIMEOUT, warm=True,
              address_space=ADDRESS_SPACE, cpu_timeout=CPU_TIMEOUT)
    outcome = yield from run(job)
    tally.cases += 1
    tally.check_run(case.name, outcome, case.expect, f"{CPU_TIMEOUT:.0f} CPU s, {TIMEOUT:.0f} s")
    if outcome.rc == 2 and "error" not in outcome.log.lower():
        tally.fail("silent usage error", case.name, "exit 2 without an error message")
    if outcome.rc in (0, 1):
        tally.notes["ran (exit 0/1)"] += 1
        for rel, path in tree(folder).items():
            if rel.endswith(".npz") and (problem := npz_problem(path)):
                tally.fail("non-finite output", case.name, f"{rel}: {problem}")
                break
    elif outcome.rc == 2:
        tally.notes["refused (exit 2)"] += 1
    if outcome.wall > SLOW and not outcome.hang:
        tally.notes[f"slower than {SLOW:.0f}s"] += 1
    stray = sorted(set(tree(recipe.parent)) - {"recipe.yaml"})
    if case.confined and stray:
        tally.fail("wrote into recipe folder", case.name, ", ".join(stray[:3]))
    if any(PWNED in rel for rel in tree(folder)):
        tally.fail("code execution", case.name, f"a YAML tag ran a command ({PWNED} file created)")
