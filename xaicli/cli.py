"""The `xai` command: parses flags into a recipe, calls the Python API, prints, sets the exit code.

Exit codes: 0 everything succeeded, 1 some inputs failed or a threshold was violated,
2 usage error (bad flags, bad recipe, output folder, model that does not load), 3 output storage
failed mid-run (disk full: finished outputs are whole, rerun to resume), 130 interrupted.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from .allocator import keep_heap
from .errors import StorageError, UsageError, XaiError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Batch explanations for neural networks: LRP, gradients, perturbations and metrics at dataset scale.",
    context_settings={"help_option_names": ["-h", "--help"]},
)
plugins_app = typer.Typer(help="List installed plugins, or show one plugin's parameters.", invoke_without_command=True)
app.add_typer(plugins_app, name="plugins")

_debug = False
_inside = False  # a command is running (signals raise KeyboardInterrupt in it)
_pending = False  # a signal came while the flags were parsed


def _floats(text: Optional[str], flag: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated numbers, e.g. 0.485,0.456,0.406; got {text!r}") from None


def _size(text: Optional[str]) -> Optional[Any]:
    if text is None:
        return None
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts if p]
    except ValueError:
        raise UsageError(f"--input-size takes N or H,W; got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _target(text: Optional[str]) -> Optional[Any]:
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def _guard(run: Callable[[], int]) -> None:
    """Turn every error into a message and an exit code; tracebacks only with --debug."""
    global _inside
    _inside = True
    try:
        if _pending:
            raise KeyboardInterrupt
        code = run()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        code = 130
    except Exception as exc:  # noqa: BLE001 - no traceback reaches a user without --debug
        if _debug:
            raise
        typer.echo(f"error: {_message(exc)}", err=True)
        code = _exit_code(exc)
    raise typer.Exit(code)


def _message(exc: BaseException) -> str:
    if isinstance(exc, XaiError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory (lower --batch-size or the methods' max_batch)"
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"internal error: {type(exc).__name__}{': ' + text if text else ''} (rerun with --debug for the traceback)"


def _exit_code(exc: BaseException) -> int:
    """2 usage (and a file the user named that cannot be used), 3 output storage failed, 1 anything else."""
    if isinstance(exc, StorageError):
        return 3
    return 2 if isinstance(exc, UsageError) or (isinstance(exc, OSError) and exc.filename is not None) else 1


def _report(result: Any, quiet: bool) -> int:
    counts = result.manifest["counts"]
    if not quiet:
        line = (f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed "
                f"({result.manifest['throughput']} images/s) -> {result.out_dir}")
        typer.echo(line, err=True)
    for skipped in result.manifest.get("skipped", {}).values():  # a method that could not run on the model
        typer.echo(f"skipped: {skipped['cause']}", err=True)
    for error in result.errors[:20]:
        typer.echo(f"failed: {error['path']}: {error['stage']}: {error['cause']}", err=True)
    if len(result.errors) > 20:
        typer.echo(f"... {len(result.errors) - 20} more in {result.out_dir / 'errors.jsonl'}", err=True)
    for reason in result.violations:  # regressions against a baseline say so themselves
        typer.echo(reason if reason.startswith("regression:") else f"threshold violated: {reason}", err=True)
    if result.storage_error:
        typer.echo(f"stopped: output storage failed: {result.storage_error}; free space and rerun to resume", err=True)
    elif result.interrupted:
        typer.echo("interrupted: rerun the same command to resume", err=True)
    return result.exit_code


def _batch(text: Optional[str]) -> Optional[Any]:
    if text is None or text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"--batch-size takes a positive number or auto; got {text!r}")
    return int(text)


def _cli_recipe(
    model: str, inputs: list[str], methods: list[str], output: Optional[Path], batch_size: Optional[str],
    device: Optional[str], target: Optional[str], sets: list[str], overwrite: bool, input_size: Optional[str],
    mean: Optional[str], std: Optional[str], labels: Optional[Path], seed: Optional[int], workers: Optional[int],
    engine: Optional[str] = None, extra: Optional[dict[str, Any]] = None,
):
    from .recipe import from_mapping

    data: dict[str, Any] = {"model": model, "inputs": list(inputs)}
    if methods:
        data["methods"] = {m: {} for m in methods}
    preprocess = {k: v for k, v in {"size": _size(input_size), "mean": _floats(mean, "--mean"),
                                    "std": _floats(std, "--std")}.items() if v is not None}
    if preprocess:
        data["preprocess"] = preprocess
    optional = {"output": str(output) if output is not None else None, "batch_size": _batch(batch_size), "device": device,
                "engine": engine,
                "target": _target(target), "labels": str(labels) if labels else None, "seed": seed, "workers": workers}
    data.update({k: v for k, v in optional.items() if v is not None})
    if overwrite:
        data["overwrite"] = True
    data.update(extra or {})
    from .registry import default_registry

    return from_mapping(data, sets=sets, registry=default_registry())


# Shared option declarations of `explain` and `evaluate`.
MODEL = typer.Argument(..., help="TorchScript file (.pt/.ts), ONNX file (.onnx) or timm:NAME")
INPUTS = typer.Argument(..., help="image files, folders (recursive) or globs")
OUTPUT = typer.Option(None, "-o", "--output", help="output folder (default xai-out)")
BATCH = typer.Option(None, "--batch-size", "-b", help="inputs per batch, or auto (default: 16 per device, chunks sized to memory)")
DEVICE = typer.Option(None, "--device", help="auto | cpu | cuda:N | a list: cuda:0,cuda:2 or cpu,cpu (default auto: every CUDA device)")
ENGINE = typer.Option(None, "--engine", help="local (default: every device here) or ray (--set engine.address=auto|ray://HOST:PORT)")
TARGET = typer.Option(None, "--target", help="class index, or a CSV file path,target (default: predicted class)")
SET = typer.Option([], "--set", help="override a recipe value: KEY.SUB=VALUE (repeatable)")
OVERWRITE = typer.Option(False, "--overwrite", help="redo inputs whose outputs already exist")
QUIET = typer.Option(False, "--quiet", "-q", help="no progress output")
SAVE = typer.Option(None, "--save-recipe", help="write the recipe of this run to FILE")
SIZE = typer.Option(None, "--input-size", help="model input size: N or H,W")
MEAN = typer.Option(None, "--mean", help="normalisation mean per channel, comma-separated")
STD = typer.Option(None, "--std", help="normalisation std per channel, comma-separated")
LABELS = typer.Option(None, "--labels", help="class names file, one per line")
SEED = typer.Option(None, "--seed", help="seed of the per-input random streams (default 0)")
WORKERS = typer.Option(None, "--workers", min=1, help="decode threads (default 4)")
DEBUG = typer.Option(False, "--debug", help="show Python tracebacks")


def _execute(recipe: Any, quiet: bool, save_recipe: Optional[Path]) -> int:
    from . import progress
    from .recipe import dump_recipe
    from .api import run_recipe

    if save_recipe:
        from .io import atomic_write_bytes

        atomic_write_bytes(save_recipe, dump_recipe(recipe, folder=save_recipe.parent).encode())
    return _report(run_recipe(recipe, progress=progress.choose(quiet)), quiet)


@app.command()
def explain(
    model: str = MODEL, inputs: List[str] = INPUTS,
    method: List[str] = typer.Option([], "-m", "--method", help="method to run (repeatable); see `xai plugins`"),
    output: Optional[Path] = OUTPUT, batch_size: Optional[str] = BATCH, device: Optional[str] = DEVICE, engine: Optional[str] = ENGINE,
    target: Optional[str] = TARGET, set_: List[str] = SET, overwrite: bool = OVERWRITE, quiet: bool = QUIET,
    save_recipe: Optional[Path] = SAVE, input_size: Optional[str] = SIZE, mean: Optional[str] = MEAN,
    std: Optional[str] = STD, labels: Optional[Path] = LABELS, seed: Optional[int] = SEED,
    workers: Optional[int] = WORKERS, debug: bool = DEBUG,
) -> None:
    """Explain a folder of images: heatmap PNGs, NPZ arrays and run.json in the output folder."""
    global _debug
    _debug = debug
    _guard(lambda: _execute(
        _cli_recipe(model, inputs, method, output, batch_size, device, target, set_, overwrite,
                    input_size, mean, std, labels, seed, workers, engine),
        quiet, save_recipe))


@app.command()
def evaluate(
    model: str = MODEL, inputs: List[str] = INPUTS,
    method: List[str] = typer.Option([], "-m", "--method", help="method to evaluate (repeatable)"),
    metric: List[str] = typer.Option([], "--metric", help="metric to compute (repeatable); see `xai plugins`"),
    masks: Optional[Path] = typer.Option(None, "--masks", help="folder of ground-truth masks mirroring the inputs (PNG)"),
    from_run: Optional[Path] = typer.Option(None, "--from", help="reuse the arrays of an earlier `xai explain` run"),
    fail_under: List[str] = typer.Option([], "--fail-under", help="METRIC=VALUE: fail when a mean score is below (repeatable)"),
    fail_over: List[str] = typer.Option([], "--fail-over", help="METRIC=VALUE: fail when a mean score is above (repeatable)"),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="an earlier `xai evaluate` output folder to compare the means with"),
    max_regression: List[str] = typer.Option([], "--max-regression",
                                             help="METRIC=DELTA or METHOD/METRIC=DELTA: fail when a mean got worse than the "
                                                  "baseline's by more than DELTA (repeatable)"),
    output: Optional[Path] = OUTPUT, batch_size: Optional[str] = BATCH, device: Optional[str] = DEVICE, engine: Optional[str] = ENGINE,
    target: Optional[str] = TARGET, set_: List[str] = SET, overwrite: bool = OVERWRITE, quiet: bool = QUIET,
    save_recipe: Optional[Path] = SAVE, input_size: Optional[str] = SIZE, mean: Optional[str] = MEAN,
    std: Optional[str] = STD, labels: Optional[Path] = LABELS, seed: Optional[int] = SEED,
    workers: Optional[int] = WORKERS, debug: bool = DEBUG,
) -> None:
    """Score explanation methods with metrics; exit 1 when a threshold is violated."""
    global _debug
    _debug = debug

    def go() -> int:
        from .baseline import parse_tolerance
        from .summary import parse_threshold

        thresholds: dict[str, dict[str, float]] = {}
        for bound, texts in (("min", fail_under), ("max", fail_over)):
            for text in texts:
                key, value = parse_threshold(text)
                thresholds.setdefault(key, {})[bound] = value
        # scores only by default; `--set writers.png.colormap=...` adds heatmaps too
        extra: dict[str, Any] = {"metrics": {m: {} for m in metric}, "overwrite": True, "writers": {}}
        if thresholds:
            extra["thresholds"] = thresholds
        if baseline:
            extra["baseline"] = str(baseline)
        if max_regression:
            extra["max_regression"] = dict(parse_tolerance(text) for text in max_regression)
        if masks:
            extra["masks"] = str(masks)
        if from_run:
            extra["from_run"] = str(from_run)
        recipe = _cli_recipe(model, inputs, method, output, batch_size, device, target, set_, overwrite,
                             input_size, mean, std, labels, seed, workers, engine, extra)
        if not recipe.metrics:
            raise UsageError("no metrics to compute: add one with --metric METRIC (list them with `xai plugins`)")
        return _execute(recipe, quiet, save_recipe)

    _guard(go)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="YAML recipe"),
    output: Optional[Path] = OUTPUT, set_: List[str] = SET, overwrite: bool = OVERWRITE,
    quiet: bool = QUIET, debug: bool = DEBUG,
) -> None:
    """Run a YAML recipe (explain, and evaluate when it has a metrics: section)."""
    global _debug
    _debug = debug

    def go() -> int:
        from .recipe import load_recipe
        from .registry import default_registry

        sets = list(set_)
        if output:
            sets.append(f"output={output}")
        if overwrite:
            sets.append("overwrite=true")
        return _execute(load_recipe(recipe, sets=sets, registry=default_registry()), quiet, None)

    _guard(go)


@app.command()
def analyze(
    run_dir: Path = typer.Argument(..., help="output folder of `xai explain` or `xai evaluate` (with arrays/)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="analysis folder (default RUN_DIR/analysis)"),
    method: List[str] = typer.Option([], "-m", "--method", help="method output to analyse (repeatable; default all)"),
    classes: Optional[str] = typer.Option(None, "--classes", help="comma-separated class indices (default all)"),
    labels: Optional[Path] = typer.Option(None, "--labels", help="CSV input,label: group by true label, not target"),
    analysis: str = typer.Option("spray", "--analysis", help="analysis plugin (see `xai plugins`)"),
    set_: List[str] = typer.Option([], "--set", help="analysis.KEY=VALUE (repeatable); see `xai plugins show spray`"),
    report: bool = typer.Option(False, "--report", help="then (re)build RUN_DIR/report with this analysis, as `xai report`"),
    quiet: bool = QUIET, debug: bool = DEBUG,
) -> None:
    """SpRAy over a run's heatmaps: per class a spectral embedding, eigengap, clusterings, 2-D views."""
    global _debug
    _debug = debug

    def go() -> int:
        from . import progress
        from .analysis.pipeline import analyze as run_analysis, parse_sets

        wanted = None
        if classes is not None:
            try:
                wanted = [int(c) for c in classes.replace(" ", "").split(",") if c]
            except ValueError:
                raise UsageError(f"--classes takes comma-separated class indices, e.g. 0,3; got {classes!r}") from None
        result = run_analysis(run_dir, output, method, wanted, labels, parse_sets(set_), analysis,
                              progress.choose(quiet, task="analyze", unit="heatmaps"))
        if not quiet:
            typer.echo(f"{len(result.groups)} groups analysed, {len(result.skipped_files)} files skipped "
                       f"-> {result.out_dir}", err=True)
        for path, cause in result.skipped_files[:20]:
            typer.echo(f"skipped: {path}: {cause}", err=True)
        if report:
            from .report import build_report

            index = build_report(run_dir, analysis=result.out_dir)
            if not quiet:
                typer.echo(f"report -> {index}", err=True)
        return result.exit_code

    _guard(go)


@app.command("report")
def report_command(
    run_dir: Path = typer.Argument(..., help="output folder of `xai explain` (or `xai evaluate`)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="report folder (default RUN_DIR/report)"),
    evaluation: Optional[Path] = typer.Option(None, "--evaluation", help="an `xai evaluate` folder (default: RUN_DIR when it has metrics.csv)"),
    analysis: Optional[Path] = typer.Option(None, "--analysis", help="an `xai analyze` folder (default: RUN_DIR/analysis when it exists)"),
    thumb_size: int = typer.Option(64, "--thumb-size", help="thumbnail side in pixels (16 to 256)"),
    debug: bool = DEBUG,
) -> None:
    """Write a static HTML report (gallery, metrics, analysis, provenance); open its index.html in a browser."""
    global _debug
    _debug = debug

    def go() -> int:
        from .report import build_report

        page = build_report(run_dir, output, evaluation=evaluation, analysis=analysis, tile=thumb_size)
        typer.echo(f"report -> {page}", err=True)
        return 0

    _guard(go)


@app.command("concepts")
def concepts_command(
    model: str = MODEL,
    inputs: List[str] = typer.Argument(None, help="image files, folders or globs (none: only --merge)"),
    layer: List[str] = typer.Option([], "--layer", "-l", help="layer whose channels are concepts (repeatable; default: the last convolution)"),
    output: Path = typer.Option(Path("xai-concepts"), "-o", "--output", help="output folder"),
    top: int = typer.Option(8, "--top", help="reference inputs kept per channel"),
    mode: str = typer.Option("relevance", "--mode", help="rank references by a channel's relevance sum (relevance) or peak (max)"),
    prototypes: int = typer.Option(0, "--prototypes", help="PCX: Gaussian-mixture prototypes per class (0: none)"),
    merge: List[Path] = typer.Option([], "--merge", help="another concepts run folder (a shard) to merge in (repeatable)"),
    references: bool = typer.Option(True, "--references/--no-references", help="render reference image grids"),
    batch_size: Optional[str] = BATCH, device: Optional[str] = DEVICE, target: Optional[str] = TARGET,
    set_: List[str] = SET, overwrite: bool = OVERWRITE, quiet: bool = QUIET, seed: Optional[int] = SEED,
    workers: Optional[int] = WORKERS, debug: bool = DEBUG,
) -> None:
    """Concept atlas (CRP): per channel the most relevant and most active inputs, class statistics, prototypes."""
    global _debug
    _debug = debug

    def go() -> int:
        from . import progress
        from .concepts.api import concepts

        keys = {k: v for k, v in {"batch_size": _batch(batch_size), "device": device, "target": _target(target),
                                  "seed": seed, "workers": workers}.items() if v is not None}
        if overwrite:
            keys["overwrite"] = True
        result = concepts(model, inputs or [], layers=layer, output=output, top=top, mode=mode, prototypes=prototypes,
                          merge=merge, references=references, sets=set_, progress=progress.choose(quiet), **keys)
        code = _report(result.run, quiet) if result.run is not None else 0
        if result.files and not quiet:
            typer.echo(f"atlas of {result.inputs} inputs, layers {', '.join(result.layers)} -> {result.out_dir}", err=True)
        return code

    _guard(go)


@plugins_app.callback()
def plugins(ctx: typer.Context) -> None:
    """List installed plugins by kind."""
    if ctx.invoked_subcommand is not None:
        return

    def go() -> int:
        from rich.console import Console
        from rich.table import Table

        from .registry import default_registry

        registry = default_registry()
        console = Console()
        for kind, table in registry.plugins.items():
            view = Table(title="analyses" if kind == "analysis" else f"{kind}s", title_justify="left", show_header=True, header_style="bold")
            for column in ("name", "description", "from"):
                view.add_column(column)
            for name in sorted(table):
                origin = registry.origins[(kind, name)]
                source = f"{origin.distribution} {origin.version}".strip() or origin.module
                view.add_row(name, table[name].description, source)
            console.print(view)
        return 0

    _guard(go)


@plugins_app.command("show")
def plugins_show(name: str = typer.Argument(..., help="plugin name")) -> None:
    """Print a plugin's parameters: name, type, default, doc."""

    def go() -> int:
        from rich.console import Console
        from rich.table import Table

        from .registry import default_registry

        registry = default_registry()
        kind, plugin = registry.find(name)
        origin = registry.origins[(kind, name)]
        console = Console()
        console.print(f"[bold]{name}[/bold] ({kind}, from {origin.distribution or origin.module}): {plugin.description}")
        extra = []
        if kind in ("method", "metric"):
            extra.append(f"needs: {plugin.needs}")
        if kind == "metric":
            extra.append(f"family: {plugin.family}, {'higher' if plugin.higher_is_better else 'lower'} is better")
        if extra:
            console.print("; ".join(extra))
        view = Table(show_header=True, header_style="bold")
        for column in ("parameter", "type", "default", "doc"):
            view.add_column(column)
        for p in plugin.params:
            doc = p.doc + (f" (one of: {', '.join(map(str, p.choices))})" if p.choices else "")
            view.add_row(p.name, p.type_name, repr(p.default), doc)
        console.print(view if plugin.params else "no parameters")
        return 0

    _guard(go)


def main() -> None:
    """Console-script entry point. Ctrl-C and SIGTERM stop with exit 130 from the first moment (the
    run loop finishes its batch first); once the command is ending, further signals are ignored, so
    no traceback is printed while Python exits."""
    keep_heap()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        app()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def _interrupt(signum: int, frame: Any) -> None:
    """The first signal interrupts the command (or, while flags are parsed, stops it as it starts);
    later ones are ignored while the command winds down."""
    global _pending
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    if _inside:
        raise KeyboardInterrupt
    _pending = True


if __name__ == "__main__":
    sys.exit(main())
