"""Recipes: one YAML mapping describes a whole run; every problem is reported with its key and line.

`load_recipe` parses a file (keeping the line of every key), applies `--set key.sub=value`
overrides and checks the schema (`FIELDS`); `validate_plugins` then checks plugin names and
parameters against a registry. Problems are collected and raised together as one RecipeError.

Paths (inputs, output, labels, a target CSV, masks, from_run, a model file, model_options.weights):
- written in a recipe file, a relative path is relative to the file's folder, so a recipe runs
  from any working directory; given through `--set`, the CLI or Python (`from_mapping` without
  `source`), it is relative to the current directory. Defaults (output `xai-out`) are relative
  to the current directory. A `Recipe` holds every path absolute and normalised.
- `dump_recipe` writes a path relative to the folder the recipe is saved in when it lies in that
  folder or next to it (at most one `..`), so a project moved as a whole keeps working; a path
  further away is written absolute. A recipe re-saved beside itself keeps its paths as written.
`timm:NAME` (any `scheme:` prefix of two or more letters) is a model name, not a path.
"""
from __future__ import annotations

import codecs
import copy
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import yaml
from yaml.constructor import SafeConstructor

from .errors import UsageError
from .params import Param, ParamErrors, resolve, short_repr
from .suggest import MAX_SUGGESTED, did_you_mean

if TYPE_CHECKING:
    from .registry import Registry

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")

FIELDS: tuple[Param, ...] = (
    Param("model", str, None, "TorchScript file (.pt/.ts), ONNX file (.onnx) or timm:NAME"),
    Param("model_options", dict, {}, "parameters of the loader that claims the model"),
    Param("preprocess", dict, {}, "overrides of the model's input spec (size, mean, std, ...)"),
    Param("labels", str, None, "class names, one per line"),
    Param("inputs", (str, list), None, "files, folders or globs to explain"),
    Param("output", str, "xai-out", "output folder"),
    Param("seed", int, 0, "seed of the per-input random streams"),
    Param("batch_size", (int, str), "auto", "inputs per batch, or auto (16 per device, methods size their chunks)", low=1, high=65_536),
    Param("device", str, "auto", "auto (every CUDA device, else the CPU), cpu, cuda:N, or a list: cuda:0,cuda:2 / cpu,cpu"),
    Param("workers", int, 4, "decode threads", low=1, high=256),
    Param("target", (int, str), None, "null: predicted class; int: that class; str: CSV file of path,target", low=0),
    Param("overwrite", bool, False, "redo inputs whose outputs exist"),
    Param("methods", dict, {}, "output name -> method parameters (`method:` defaults to the name)"),
    Param("writers", dict, {"png": {}, "npz": {}}, "writer name -> parameters"),
    Param("metrics", dict, {}, "output name -> metric parameters (`metric:` defaults to the name)"),
    Param("thresholds", dict, {}, "metric output name -> {min: x} and/or {max: y}"),
    Param("baseline", str, None, "an earlier `xai evaluate` output folder whose mean scores this evaluation is compared with"),
    Param("max_regression", dict, {}, "metric (or method/metric) -> how much worse than the baseline its mean may get"),
    Param("masks", str, None, "folder of ground-truth masks (localisation metrics)"),
    Param("from_run", str, None, "an earlier `xai explain` output folder whose arrays `xai evaluate` scores"),
    Param("limits", dict, {}, "decode budgets per input: max_pixels, max_aspect, preview_pixels, inflight_bytes"),
    Param("engine", (str, dict), "local", "where batches run: local (every device here) or ray; `{name: ray, address: auto}`"),
)
"""The recipe schema, in the order `dump_recipe` writes it. A null value means the default."""

REQUIRED = ("model", "inputs")

PREPROCESS: tuple[Param, ...] = (
    Param("size", (int, list), None, "model input size: an int or [height, width]", low=1, high=4096, length=2),
    Param("mean", (float, list), None, "per-channel mean: one value or one per channel"),
    Param("std", (float, list), None, "per-channel standard deviation: one value or one per channel"),
    Param("interpolation", str, None, "resize filter", choices=INTERPOLATIONS),
    Param("crop_pct", float, None, "center-crop fraction: the short side is resized to size / crop_pct", low=0.01, high=1.0),
    Param("channels", int, None, "input channels (1 grey, 3 RGB)", choices=(1, 3)),
)

_TABLES = (("methods", "method", "method"), ("metrics", "metric", "metric"), ("writers", "writer", None))
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]*")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9_+.-]+:")
MODULE_SCHEME = "python:"  # the model of a Python API call handed an nn.Module (no loader: xaicli.api)
_DEVICE = re.compile(r"auto|(cpu|cuda(:\d+)?)(,(cpu|cuda(:\d+)?))*")
_MERGE = "tag:yaml.org,2002:merge"
_CONTAINER_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")
_CONSTRUCT_ERRORS = (yaml.YAMLError, ValueError, OverflowError, AttributeError, KeyError, TypeError)
"""What SafeConstructor raises for a tagged scalar it cannot read: 2001-02-30, a 5,000-digit int,
`!!timestamp x` (AttributeError), `!!bool x` (KeyError), `!!binary é` (UnicodeEncodeError)."""
_YAML = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml composes 20,000 keys in 0.3 s, Python in 2 s

# Hard bounds: no recipe or --set value may cost more than ~a second or a few MB to read and check.
MAX_BYTES = 1 << 20  # a recipe file or one --set value
MAX_DEPTH = 64  # nesting of mappings and lists
MAX_NODES = 100_000  # values written in a recipe
MAX_ALIAS_VALUES = 10_000  # values that YAML aliases may add by repeating anchored ones
MAX_ENTRIES = 256  # outputs of one table (methods, metrics, writers, thresholds)
MAX_SHOWN = 20  # problems an error message lists
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


@dataclass
class Problem:
    """One thing wrong with a recipe: the key path, where it was written, and what is wrong."""

    key: str
    line: int | None
    message: str
    source: str | None = None  # the recipe file, "--set", or None for Python mappings

    def __str__(self) -> str:
        where = f"{self.source or ''}:{self.line}" if self.line is not None else self.source or ""
        head = ": ".join(part for part in (where, self.key) if part)
        return f"{head}: {self.message}" if head else self.message


class RecipeError(UsageError):
    """Every problem of a recipe at once; str() has one line per problem (the first MAX_SHOWN)."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        lines = [str(p) for p in self.problems[:MAX_SHOWN]]
        if len(self.problems) > MAX_SHOWN:
            lines.append(f"... and {len(self.problems) - MAX_SHOWN} more problems")
        super().__init__("\n".join(lines))


class _Unreadable(Exception):
    """The text cannot be read: encoding, YAML syntax, or a hard bound (size, depth, nodes, aliases)."""

    def __init__(self, key: str, line: int | None, message: str):
        super().__init__(message)
        self.problem = Problem(key, line, message)


@dataclass(kw_only=True)
class Recipe:
    """A validated run description; see FIELDS. Paths are absolute (module docstring)."""

    model: str
    model_options: dict[str, Any]
    preprocess: dict[str, Any]
    labels: str | None
    inputs: list[str]
    output: str
    seed: int
    batch_size: int
    device: str
    workers: int
    target: int | str | None
    overwrite: bool
    methods: dict[str, dict[str, Any]]
    writers: dict[str, dict[str, Any]]
    metrics: dict[str, dict[str, Any]]
    thresholds: dict[str, dict[str, float]]
    baseline: str | None
    max_regression: dict[str, float]
    masks: str | None
    from_run: str | None
    limits: dict[str, Any]
    engine: dict[str, Any]
    source: Path | None = field(default=None, compare=False)
    lines: dict[str, int] = field(default_factory=dict, compare=False)  # key path -> 1-based line in source
    overrides: tuple[str, ...] = field(default=(), compare=False)  # key paths set by --set
    resolved: dict[str, Any] | None = field(default=None, compare=False)  # plugins checked against a registry

    @property
    def engine_name(self) -> str:
        return self.engine.get("name", "local")

    @property
    def engine_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.engine.items() if k != "name"}


@dataclass
class _Report:
    """Collects problems and knows where each key path came from (file line or --set)."""

    source: str | None
    lines: dict[str, int]
    overrides: tuple[str, ...] = ()
    problems: list[Problem] = field(default_factory=list)
    seen: set[tuple] = field(default_factory=set)  # problems as tuples: `add` stays O(1) for 20,000 of them

    def overridden(self, key: str) -> bool:
        return bool(self.overrides) and any(key == s or key.startswith(s + ".") for s in self.overrides)

    def add(self, key: str, message: str, line: int | None = None) -> None:
        if line is not None:
            problem = Problem(key, line, message, self.source)
        elif self.overridden(key) or (key not in self.lines and any(s.startswith(key + ".") for s in self.overrides)):
            problem = Problem(key, None, message, "--set")
        else:
            problem = Problem(key, self._line(key), message, self.source)
        if (identity := (problem.key, problem.line, problem.message, problem.source)) not in self.seen:
            self.seen.add(identity)  # a node reached twice through a YAML alias is reported once
            self.problems.append(problem)

    def _line(self, key: str) -> int | None:
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            if (line := self.lines.get(".".join(parts[:n]))) is not None:
                return line
        return None

    def raise_if_any(self) -> None:
        if self.problems:
            raise RecipeError(sorted(self.problems, key=lambda p: (p.line is None, p.line or 0)))


class _Reader:
    """Plain data from composed YAML nodes, recording the line of every key path.

    PyYAML's own loader keeps the last of duplicate keys silently and forgets lines; reading the
    composed nodes reports duplicates (with both lines) and lets errors name their line.
    Aliases share node objects, so a node is read once per alias: `nodes` (the count composed)
    plus MAX_ALIAS_VALUES bounds the reads, and MAX_DEPTH the nesting that alias chains build.
    """

    def __init__(self, report: _Report, nodes: int):
        self.report = report
        self.constructor = SafeConstructor()
        self.active: set[int] = set()  # the nodes being read: the path from the root
        self.left = nodes + MAX_ALIAS_VALUES

    def value(self, node: yaml.Node, path: str) -> Any:
        line = node.start_mark.line + 1
        if id(node) in self.active:
            self.report.add(path, "recursive YAML alias", line)
            return None
        self.left -= 1
        if self.left < 0:  # the line of the top-level key: nodes deeper down are shared with their anchor
            raise _Unreadable(path, self.report.lines.get(path.split(".")[0], line), f"YAML aliases repeat more "
                            f"than {MAX_ALIAS_VALUES:,} values (an alias bomb?); write the values out")
        if len(self.active) >= MAX_DEPTH:
            raise _Unreadable(path, line, f"nested deeper than {MAX_DEPTH} levels (through YAML aliases)")
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and node.tag not in _CONTAINER_TAGS:
            self.report.add(path, f"unsupported YAML tag {node.tag}", line)
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, path)
            if isinstance(node, yaml.SequenceNode):
                return [self.value(item, self.record(path, str(i), item)) for i, item in enumerate(node.value)]
            return self.constructor.construct_object(node)
        except _CONSTRUCT_ERRORS as exc:
            self.report.add(path, f"cannot read value: {getattr(exc, 'problem', None) or exc}", line)
            return None
        finally:
            self.active.discard(id(node))

    def mapping(self, node: yaml.MappingNode, path: str) -> dict[str, Any]:
        own = sum(1 for key, _ in node.value if key.tag != _MERGE)
        self.constructor.flatten_mapping(node)  # `<<: *anchor` merges go first, own keys last
        merged = len(node.value) - own
        out: dict[str, Any] = {}
        first: dict[str, int] = {}
        for i, (key_node, value_node) in enumerate(node.value):
            name = self.key(key_node, path)
            line = key_node.start_mark.line + 1
            if i >= merged and name in first:
                lines = f"lines {first[name]} and {line}" if first[name] != line else f"twice on line {line}"
                self.report.add(_join(path, name), f"duplicate key ({lines}); keep one", line)
            if i >= merged:
                first.setdefault(name, line)
            out[name] = self.value(value_node, self.record(path, name, key_node))
        return out

    def key(self, node: yaml.Node, path: str) -> str:
        try:
            name = self.constructor.construct_object(node) if isinstance(node, yaml.ScalarNode) else None
        except _CONSTRUCT_ERRORS:
            name = None
        if isinstance(name, str):
            return name
        text = str(node.value)[:60] if isinstance(node, yaml.ScalarNode) else "?"
        self.report.add(_join(path, text), "keys must be strings (quote it)", node.start_mark.line + 1)
        return text

    def record(self, path: str, name: str, node: yaml.Node) -> str:
        key = _join(path, name)
        self.report.lines[key] = node.start_mark.line + 1
        return key


def load_recipe(path: str | Path, sets: Sequence[str] = (), registry: Registry | None = None) -> Recipe:
    """Read a recipe file, apply `--set` overrides and check the schema; raise RecipeError with every problem.

    With a `registry`, plugin names and parameters are checked in the same pass (see
    `validate_plugins`), so one error lists every problem of the recipe.
    """
    path = Path(path)
    report = _Report(str(path), {})
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise RecipeError([Problem("", None, f"cannot read recipe: {exc.strerror or exc}", str(path))]) from exc
    try:
        data = _read_yaml(_text(raw), report, "")
    except _Unreadable as exc:
        exc.problem.source = str(path)
        raise RecipeError([exc.problem]) from None
    return _build(data, sets, path, report, registry)


def _text(raw: bytes) -> str:
    """The text of a recipe file: UTF-8 (a leading BOM is dropped), at most MAX_BYTES."""
    if len(raw) > MAX_BYTES:
        raise _Unreadable("", None, f"larger than {MAX_BYTES >> 20} MiB: not a recipe")
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            raise _Unreadable("", None, f"{encoding} text (byte-order mark); save the recipe as UTF-8")
    if b"\0" in raw:
        raise _Unreadable("", None, "binary data (NUL bytes), not UTF-8 YAML text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise _Unreadable("", line, f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None


def _read_yaml(text: str, report: _Report, path: str) -> Any:
    """Plain data of one YAML document, within the MAX_* bounds; line of every key path in report.lines."""
    nodes = _scan(text, path)
    try:
        node = yaml.compose(text, Loader=_YAML)
    except yaml.YAMLError as exc:  # what the scan lets through: several documents
        mark = getattr(exc, "problem_mark", None)
        message = getattr(exc, "problem", None) or str(exc)
        raise _Unreadable(path, mark.line + 1 if mark is not None else None, f"invalid YAML: {message}") from None
    return _Reader(report, nodes).value(node, path) if node is not None else None


def _scan(text: str, root: str) -> int:
    """The number of nodes of `text`, checked against MAX_NODES and MAX_DEPTH before composing.

    PyYAML's composer recurses once per level (libyaml's in C), so 50,000 nested brackets would
    end in a RecursionError or a crash; the parser's events come from an explicit stack.
    """
    stack: list[list] = []  # per open collection: [is a mapping, children so far, event of the last key]

    def where(more: str = "") -> str:
        names = [str(getattr(e[2], "value", "?"))[:60] if e[0] else str(e[1] - 1) for e in stack if e[1]]
        return ".".join(filter(None, [root, *names[:4]])) + (more if len(names) > 4 else "")

    nodes = 0
    events = yaml.parse(text, Loader=_YAML)
    while True:
        try:
            event = next(events, None)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            message = f"invalid YAML: {getattr(exc, 'problem', None) or exc}"
            raise _Unreadable(where("..."), mark.line + 1 if mark is not None else None, message) from None
        kind = type(event)
        if kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
            stack.pop()
            continue
        if kind is not yaml.ScalarEvent and kind not in _OPENING and kind is not yaml.AliasEvent:
            if event is None:
                return nodes
            continue
        if stack:
            parent = stack[-1]
            if parent[0] and not parent[1] & 1:
                parent[2] = event
            parent[1] += 1
        if kind is yaml.AliasEvent:
            continue
        nodes += 1
        if nodes > MAX_NODES:
            raise _Unreadable(where(), event.start_mark.line + 1, f"more than {MAX_NODES:,} values: not a recipe")
        if kind in _OPENING:
            if len(stack) >= MAX_DEPTH:
                raise _Unreadable(where("..."), event.start_mark.line + 1, f"nested deeper than {MAX_DEPTH} levels")
            stack.append([kind is yaml.MappingStartEvent, 0, None])


_OPENING = (yaml.MappingStartEvent, yaml.SequenceStartEvent)


def from_mapping(
    data: dict,
    sets: Sequence[str] = (),
    source: str | Path | None = None,
    lines: dict[str, int] | None = None,
    registry: Registry | None = None,
) -> Recipe:
    """Build a Recipe from a mapping (CLI flags, Python, parsed YAML); relative paths resolve against
    `source`'s folder when given, else the current directory. `registry` as in `load_recipe`."""
    source = None if source is None else Path(source)
    report = _Report(None if source is None else str(source), dict(lines or {}))
    return _build(data, sets, source, report, registry)


def apply_sets(data: dict, sets: Sequence[str]) -> dict:
    """A copy of `data` with `key.sub=value` overrides applied; values are YAML scalars or flow
    collections (`32`, `true`, `[1, 2]`, `{abs: true}`, `abc`); missing mappings are created."""
    report = _Report(None, {})
    try:
        data = _plain(data)
    except _Unreadable as exc:
        raise RecipeError([exc.problem]) from None
    out = _apply_sets(data, sets, report)
    report.raise_if_any()
    return out


def _apply_sets(data: dict, sets: Sequence[str], report: _Report) -> dict:
    for item in sets:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or "" in parts or len(parts) > MAX_DEPTH:
            message = "expected KEY=VALUE, e.g. methods.occlusion.window=32"
            report.problems.append(Problem(item[:80], None, message, "--set"))
            continue
        read = _Report("--set", {})
        try:
            if len(text) > MAX_BYTES:
                raise _Unreadable(key, None, f"longer than {MAX_BYTES >> 20} MiB")
            value = _read_yaml(text, read, key)
        except _Unreadable as exc:
            message = exc.problem.message.removeprefix("invalid YAML: ")
            report.problems.append(Problem(key, None, f"cannot parse value {text[:60]!r}: {message}", "--set"))
            continue
        if read.problems:
            report.problems.extend(Problem(p.key, None, p.message, "--set") for p in read.problems)
            continue
        node = data
        for depth, part in enumerate(parts[:-1], 1):
            if node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], dict):
                parent = ".".join(parts[:depth])
                message = f"cannot set {key}: {parent} is {_kind(node[part])}, not a mapping"
                report.problems.append(Problem(parent, None, message, "--set"))
                break
            node = node[part]
        else:
            node[parts[-1]] = value
            report.overrides += (key,)
    return data


def _build(data: Any, sets: Sequence[str], source: Path | None, report: _Report, registry: Registry | None) -> Recipe:
    if not isinstance(data, dict):
        report.add("", f"a recipe is a mapping of keys (model, inputs, methods, ...); got {_kind(data)}")
        report.raise_if_any()
    try:
        data = _plain(data)
    except _Unreadable as exc:
        report.add(exc.problem.key, exc.problem.message)
        report.raise_if_any()
    if isinstance(data.get("engine"), str):  # `engine: ray` takes `--set engine.address=...` too
        data["engine"] = {"name": data["engine"]}
    data = _apply_sets(data, sets, report)
    report.lines = {k: v for k, v in report.lines.items() if not report.overridden(k)}
    values = _check_fields(data, report)
    folder = source.resolve().parent if source is not None else None

    def absolute(path: str, key: str) -> str:
        from_file = folder is not None and key.split(".")[0] in data and not report.overridden(key)
        return os.path.normpath(os.path.join(folder if from_file else os.getcwd(), os.path.expanduser(path)))

    _map_paths(values, absolute)
    recipe = Recipe(**values, source=source, lines=report.lines, overrides=report.overrides)
    if registry is not None:
        recipe.resolved = _check_plugins(recipe, registry, report)
    report.raise_if_any()
    return recipe


def _check_fields(data: dict, report: _Report) -> dict[str, Any]:
    known = {p.name for p in FIELDS}
    unknown = [str(key) for key in data if key not in known]
    for i, key in enumerate(unknown):
        report.add(key, f"unknown key{did_you_mean(key, known) if i < MAX_SUGGESTED else ''}")
    values: dict[str, Any] = {}
    for p in FIELDS:
        values[p.name] = copy.deepcopy(p.default)
        if data.get(p.name) is None:
            if p.name in REQUIRED and not any(q.key == p.name for q in report.problems):  # not unreadable
                report.add(p.name, f"missing required key ({p.doc})")
            continue
        try:
            values[p.name] = p.check(data[p.name])
        except ValueError as exc:
            report.add(p.name, str(exc))
    values["inputs"] = _inputs(values["inputs"], report)
    if not values["output"].strip():
        report.add("output", "empty: name the output folder (default xai-out)")
    if not _DEVICE.fullmatch(values["device"]):
        report.add("device", f"expected auto, cpu, cuda, cuda:N or a comma-separated list of them; got {values['device']!r}")
    values["batch_size"] = _batch_size(values["batch_size"], report)
    values["engine"] = _engine(values["engine"], report)
    values["limits"] = _limits(values["limits"], report)
    values["preprocess"] = _preprocess(values["preprocess"], report)
    for table, _, alias in _TABLES:
        values[table] = _plugin_table(values[table], table, alias, report)
    values["thresholds"] = _thresholds(values["thresholds"], values["metrics"], values["methods"], report)
    values["max_regression"] = _regressions(values["max_regression"], values["baseline"], values["metrics"],
                                            values["methods"], report)
    return values


def _batch_size(value: int | str, report: _Report) -> int | str:
    if isinstance(value, str) and value != "auto":
        report.add("batch_size", f"expected a positive int or auto; got {value!r}")
        return "auto"
    return value


def _limits(given: dict, report: _Report) -> dict[str, Any]:
    from .data import DecodeLimits

    known = {f.name for f in fields(DecodeLimits)}
    for key in given:
        if key not in known:
            report.add(f"limits.{key}", f"unknown limit{did_you_mean(str(key), known)}; known: {', '.join(sorted(known))}")
    checked = {k: v for k, v in given.items() if k in known}
    try:
        DecodeLimits(**checked)
    except UsageError as exc:
        report.add(f"limits.{str(exc).split()[0].split('.', 1)[-1]}", str(exc).split(" ", 1)[1])
        return {}
    return checked


def _engine(value: str | dict, report: _Report) -> dict[str, Any]:
    engine = {"name": value} if isinstance(value, str) else dict(value)
    if not isinstance(engine.get("name", "local"), str):
        report.add("engine.name", f"expected an engine name (local, ray); got {_kind(engine.get('name'))}")
        engine["name"] = "local"
    engine.setdefault("name", "local")
    return engine


def _inputs(inputs: str | list | None, report: _Report) -> list[str]:
    items = [inputs] if isinstance(inputs, str) else list(inputs or [])
    if inputs is not None and not items:
        report.add("inputs", "list at least one file, folder or glob")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item:
            report.add(f"inputs.{i}", f"expected a file, folder or glob; got {_kind(item)}")
    return items


def _preprocess(given: dict, report: _Report) -> dict[str, Any]:
    try:
        values = {k: v for k, v in resolve(PREPROCESS, given).items() if k in given}
    except ParamErrors as exc:  # report them, and check the other keys together
        for error in exc.errors:
            report.add(f"preprocess.{error.key}", error.message)
        values = {k: v for k, v in given.items() if k not in {e.key for e in exc.errors}}
    channels = values.get("channels")
    for key in ("mean", "std"):
        value = values.get(key)
        numbers = value if isinstance(value, list) else [value]
        if value is None:
            continue
        if not numbers:
            report.add(f"preprocess.{key}", f"expected a number or a list of numbers; got {value!r}")
        elif key == "std" and not all(v > 0 for v in numbers):
            report.add("preprocess.std", f"must be > 0; got {short_repr(value)}")
        elif len(numbers) not in (1, channels or 3):
            count = channels or "1 or 3"
            report.add(f"preprocess.{key}", f"give one value or one per channel ({count}); got {short_repr(value)}")
    return values


def _plugin_table(table: dict, name: str, alias: str | None, report: _Report) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if len(table) > MAX_ENTRIES:
        report.add(name, f"{len(table):,} entries; at most {MAX_ENTRIES}")
        return out
    for entry, params in table.items():
        key = f"{name}.{entry}"
        if not isinstance(entry, str) or not _NAME.fullmatch(entry):
            report.add(key, "names become folder names: use letters, digits, '_', '+' and '-'")
            continue
        if params is not None and not isinstance(params, dict):
            report.add(key, f"expected a mapping of parameters (or nothing for defaults); got {_kind(params)}")
            continue
        params = dict(params or {})
        if alias and alias in params and not isinstance(params[alias], str):
            report.add(f"{key}.{alias}", f"expected a {alias} name; got {_kind(params[alias])}")
            continue
        out[entry] = params
    return out


def _thresholds(table: dict, metrics: dict, methods: dict, report: _Report) -> dict[str, dict[str, float]]:
    """`metric` applies to every method, `method/metric` to one; `mprt/layer3` names a detail of mprt."""
    bound = Param("bound", float, 0.0, "")
    out: dict[str, dict[str, float]] = {}
    for name, key, bounds in _metric_entries(table, "thresholds", metrics, methods, report):
        if not isinstance(bounds, dict) or not bounds:
            report.add(key, f"expected {{min: x}} and/or {{max: y}}; got {_kind(bounds)}")
            continue
        checked: dict[str, float] = {}
        for side, value in bounds.items():
            if side not in ("min", "max"):
                report.add(f"{key}.{side}", f"unknown bound{did_you_mean(str(side), ('min', 'max'))}; use min or max")
                continue
            try:
                checked[side] = bound.check(value)
            except ValueError as exc:
                report.add(f"{key}.{side}", str(exc))
        if checked.get("min", float("-inf")) > checked.get("max", float("inf")):
            report.add(key, f"min {checked['min']} is above max {checked['max']}")
        out[name] = checked
    return out


def _metric_entries(table: dict, where: str, metrics: dict, methods: dict, report: _Report) -> Iterator[tuple[Any, str, Any]]:
    """(name, key path, value) of a table keyed by `metric` or `method/metric`; names that are no
    metric output of the recipe are reported; more than MAX_ENTRIES entries yield nothing."""
    if len(table) > MAX_ENTRIES:
        report.add(where, f"{len(table):,} entries; at most {MAX_ENTRIES}")
        return
    for name, value in table.items():
        key = f"{where}.{name}"
        parts = str(name).split("/")
        metric = parts[1] if len(parts) > 1 and parts[0] in (methods or {}) else parts[0]
        if metric not in metrics:
            report.add(key, f"no metric output {metric!r} under metrics{did_you_mean(metric, metrics)}")
        yield name, key, value


def _regressions(table: dict, baseline: str | None, metrics: dict, methods: dict, report: _Report) -> dict[str, float]:
    """`metric: delta` for every method, `method/metric: delta` for one; deltas ≥ 0; needs `baseline`."""
    delta = Param("delta", float, 0.0, "", low=0.0)
    out: dict[str, float] = {}
    if table and baseline is None:
        report.add("max_regression", "needs `baseline:` (the output folder of an earlier `xai evaluate`)")
    for name, key, value in _metric_entries(table, "max_regression", metrics, methods, report):
        try:
            out[str(name)] = delta.check(value)
        except ValueError as exc:
            report.add(key, str(exc))
    return out


def validate_plugins(recipe: Recipe, registry: Registry) -> dict[str, dict[str, Any]]:
    """Check plugin names and parameters against `registry`; return them resolved with defaults:
    {"methods": {out: {"method": name, **params}}, "metrics": {out: {"metric": name, **params}},
    "writers": {name: params}, "model_options": params}. Raise RecipeError with every problem."""
    report = _Report(None if recipe.source is None else str(recipe.source), recipe.lines, recipe.overrides)
    resolved = _check_plugins(recipe, registry, report)
    report.raise_if_any()
    return resolved


def problems_of(recipe: Recipe, entries: Sequence[tuple[str, str]]) -> RecipeError:
    """A RecipeError of (key path, message) pairs, each with the line the key was written on."""
    report = _Report(None if recipe.source is None else str(recipe.source), recipe.lines, recipe.overrides)
    for key, message in entries:
        report.add(key, message)
    return RecipeError(sorted(report.problems, key=lambda p: (p.line is None, p.line or 0)))


def _check_plugins(recipe: Recipe, registry: Registry, report: _Report) -> dict[str, dict[str, Any]]:
    resolved: dict[str, dict[str, Any]] = {"methods": {}, "metrics": {}, "writers": {}, "model_options": {}}
    for table, kind, alias in _TABLES:
        for entry, params in getattr(recipe, table).items():
            key = f"{table}.{entry}"
            name = params.get(alias, entry) if alias else entry
            try:
                plugin = registry.get(kind, name)
            except UsageError as exc:
                report.add(f"{key}.{alias}" if alias and alias in params else key, str(exc))
                continue
            if getattr(plugin, "needs_masks", False) and recipe.masks is None:
                report.add(key, f"metric {name!r} needs ground-truth masks: set `masks:` to a folder of masks")
            values = _resolve(plugin.params, params, key, report, (alias,) if alias else ())
            if values is not None:
                resolved[table][entry] = {alias: name, **values} if alias else values
    if recipe.engine_name not in registry.plugins["engine"]:
        try:
            registry.get("engine", recipe.engine_name)
        except UsageError as exc:
            report.add("engine.name" if "engine.name" in report.lines else "engine", str(exc))
    if recipe.model is None or recipe.model.startswith(MODULE_SCHEME):  # missing, or a module object
        return resolved
    try:
        loader = registry.loader_for(recipe.model)
    except UsageError as exc:
        report.add("model", str(exc))
    else:
        resolved["model_options"] = _resolve(loader.params, recipe.model_options, "model_options", report) or {}
    return resolved


def _resolve(declared: Sequence[Param], given: dict, key: str, report: _Report, reserved: Sequence[str] = ()) -> dict | None:
    """`params.resolve` with each problem reported under `key`; None when there were problems."""
    try:
        return resolve(declared, given, reserved)
    except ParamErrors as exc:
        for error in exc.errors:
            report.add(f"{key}.{error.key}", error.message)
        return None


def dump_recipe(recipe: Recipe, folder: str | Path | None = None) -> str:
    """YAML text of `recipe` (keys in schema order, nulls left out) that reads back to an equal Recipe
    when saved in `folder` (default: the recipe's own folder, else the current directory)."""
    base = Path(folder) if folder is not None else recipe.source.parent if recipe.source is not None else Path.cwd()
    base = base.resolve()

    def relative(path: str, key: str) -> str:
        try:
            rel = os.path.relpath(path, base)
        except ValueError:  # another drive
            return path
        return path if rel.startswith(os.path.join(os.pardir, os.pardir)) else rel

    data = {f.name: copy.deepcopy(getattr(recipe, f.name)) for f in fields(recipe) if f.compare}
    _map_paths(data, relative)
    data = {k: v for k, v in data.items() if v is not None}
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True)


def _map_paths(values: dict[str, Any], fn: Callable[[str, str], str]) -> None:
    """Replace every path value of a checked recipe mapping by fn(path, key path), in place."""
    for key in ("labels", "output", "masks", "from_run", "baseline", "target"):
        if isinstance(values.get(key), str):
            values[key] = fn(values[key], key)
    if isinstance(values.get("model"), str) and not _SCHEME.match(values["model"]):
        values["model"] = fn(values["model"], "model")
    values["inputs"] = [fn(p, f"inputs.{i}") if isinstance(p, str) else p for i, p in enumerate(values.get("inputs") or [])]
    options = values.get("model_options")
    if isinstance(options, dict) and isinstance(options.get("weights"), str):
        options["weights"] = fn(options["weights"], "model_options.weights")


def _plain(value: Any) -> Any:
    """A deep copy with tuples as lists and Paths as str (what YAML would have given); _Unreadable
    past MAX_DEPTH levels or MAX_NODES values (a Python mapping may share or contain itself)."""
    left = MAX_NODES + MAX_ALIAS_VALUES

    def copy(value: Any, path: str, depth: int) -> Any:
        nonlocal left
        left -= 1
        if left < 0 or depth > MAX_DEPTH:
            raise _Unreadable(path, None, f"more than {MAX_NODES:,} values" if left < 0 else
                            f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            return {k: copy(v, _join(path, str(k)), depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [copy(v, _join(path, str(i)), depth + 1) for i, v in enumerate(value)]
        return str(value) if isinstance(value, Path) else value

    return copy(value, "", 0)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {short_repr(value)}"

