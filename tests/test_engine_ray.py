"""The ray engine on a local Ray cluster of two simulated nodes (1 CPU each), shared by the module."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the ray engine needs Ray: pip install 'xaicli[ray]'")
pytest.importorskip("ray.data", reason="the ray engine needs Ray Data: pip install 'xaicli[ray]'")

from ray.cluster_utils import Cluster  # noqa: E402

from xaicli.api import run_recipe  # noqa: E402
from xaicli.descriptors import Method  # noqa: E402
from xaicli.errors import UsageError  # noqa: E402
from xaicli.hookspecs import hookimpl  # noqa: E402
from xaicli.params import Param  # noqa: E402
from xaicli.recipe import from_mapping  # noqa: E402
from xaicli.registry import create_registry, default_registry  # noqa: E402
from xaicli.rng import BatchRNG, derive_seed  # noqa: E402
from xaicli_plugins.methods.gradient import saliency  # noqa: E402

XAI = [sys.executable, "-m", "xaicli.cli"]
METHODS = {
    "saliency": {},
    "lrp": {},
    "integrated_gradients": {"steps": 8},
    "occlusion": {"window": 8, "stride": 4},
    "lime": {"samples": 64, "segments": 16},
}
BAD = {"bad/garbage.png": b"\x89PNG not really an image", "bad/empty.png": b""}


@pytest.fixture(scope="module")
def cluster():
    """Two simulated nodes of 1 CPU each; runs join it through `engine.address`."""
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="module")
def inputs(digits, tmp_path_factory) -> Path:
    """The 20 digit PNGs and two corrupt files."""
    folder = tmp_path_factory.mktemp("ray-inputs") / "images"
    shutil.copytree(digits.images, folder)
    for rel, data in BAD.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def recipe(digits, inputs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray-recipe") / "recipe.yaml"
    path.write_text(json.dumps({"model": str(digits.torchscript), "inputs": [str(inputs)], "methods": METHODS,
                                "batch_size": 4}))
    return path


@pytest.fixture(scope="module")
def local_run(recipe, tmp_path_factory) -> Path:
    """The reference: the recipe run by the local engine."""
    from xaicli.api import run_file

    out = tmp_path_factory.mktemp("ray-local") / "out"
    result = run_file(recipe, sets=[f"output={out}"])
    assert result.exit_code == 1 and len(result.errors) == len(BAD)
    return out


def files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for folder in ("arrays", "heatmaps") for p in sorted((out / folder).rglob("*")) if p.is_file()}


def relevance(out: Path, output: str) -> dict[str, np.ndarray]:
    found = {}
    for path in sorted((out / "arrays" / output).rglob("*.npz")):
        with np.load(path, allow_pickle=False) as npz:
            found[path.relative_to(out / "arrays" / output).as_posix()] = npz["relevance"]
    return found


def manifest(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def failed_inputs(out: Path) -> list[tuple[str, str]]:
    return [(e["input"], e["stage"]) for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("write", ["actors", "driver"])
def test_ray_and_local_engines_write_identical_outputs(cluster, recipe, local_run, tmp_path, write):
    """Actors writing their inputs' files (the default) or the driver writing every file: the same bytes."""
    out = tmp_path / "ray"
    done = subprocess.run([*XAI, "run", recipe, "-o", out, "--quiet", "--set", "engine.name=ray",
                           "--set", f"engine.address={cluster.address}", "--set", f"engine.write={write}"],
                          capture_output=True, text=True)
    assert done.returncode == 1, done.stderr  # 1: the corrupt inputs failed, the others are done
    ours, reference = files(out), files(local_run)
    assert sorted(ours) == sorted(reference)
    assert len(reference) == 2 * len(METHODS) * 20  # an NPZ and a PNG per method and good input
    assert [name for name in reference if ours[name] != reference[name]] == []
    assert failed_inputs(out) == failed_inputs(local_run)
    assert sorted(i for i, _ in failed_inputs(out)) == sorted(BAD)
    assert manifest(out)["counts"] == manifest(local_run)["counts"] == {"done": 20, "skipped": 0, "failed": 2}
    assert manifest(out)["recipe"]["engine"] == {"name": "ray", "address": cluster.address, "actors": None,
                                                 "write": write}


# -- test methods: saliency, with a deterministic hook into the Ray worker that runs it -----------

def _has(rng: BatchRNG, relpath: str, output: str) -> bool:
    return BatchRNG([derive_seed(0, relpath)]).child(output).seeds[0] in rng.seeds


def _die_once(model, x, target, rng, marker: str = "", victim: str = ""):
    """Saliency; the first worker handed `victim` kills its own process (SIGKILL) mid-batch."""
    if _has(rng, victim, "saliency") and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return saliency(model, x, target, rng)


def _gated(model, x, target, rng, gate: str = "", held: str = ""):
    """Saliency; the batch holding `held` waits until the file `gate` exists."""
    while _has(rng, held, "saliency") and not os.path.exists(gate):
        time.sleep(0.05)
    return saliency(model, x, target, rng)


class TestMethods:
    @staticmethod
    @hookimpl
    def xai_methods() -> list[Method]:
        return [
            Method("die_once", "saliency; kills its worker once", _die_once,
                   (Param("marker", str, "", "file created when the worker dies"), Param("victim", str, "", "input"))),
            Method("gated", "saliency; waits for a file", _gated,
                   (Param("gate", str, "", "file to wait for"), Param("held", str, "", "input"))),
        ]


def registry():
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    return create_registry(extra=[TestMethods])


def explain(method: dict, model: str, inputs: Path, out: Path, engine: dict, reg=None):
    """Saliency (or a test method standing in for it) on `inputs`, in batches of 2."""
    reg = reg or registry()
    data = {"model": model, "inputs": [str(inputs)], "methods": {"saliency": method},
            "output": str(out), "batch_size": 2, "engine": engine}
    return run_recipe(from_mapping(data, registry=reg), registry=reg)


def test_a_worker_killed_mid_run_loses_no_input(cluster, digits, inputs, local_run, tmp_path):
    marker = tmp_path / "died"
    victim = min(p.relative_to(inputs).as_posix() for p in (inputs / "5").iterdir())  # a batch in the middle
    method = {"method": "die_once", "marker": str(marker), "victim": victim}
    result = explain(method, str(digits.torchscript), inputs, tmp_path / "out",
                     {"name": "ray", "address": cluster.address})
    assert marker.is_file()  # a worker did die, holding a batch
    assert result.manifest["counts"] == {"done": 20, "skipped": 0, "failed": 2}
    assert sorted(i for i, _ in failed_inputs(tmp_path / "out")) == sorted(BAD)
    ours, reference = relevance(tmp_path / "out", "saliency"), relevance(local_run, "saliency")
    assert sorted(ours) == sorted(reference)  # each input once, every file whole
    assert all(np.array_equal(ours[k], reference[k]) for k in reference)
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and ".tmp" in p.name]


INTERRUPTED = """
import sys
sys.path.insert(0, {tests!r})
import test_engine_ray as t
result = t.explain({method!r}, {model!r}, t.Path({inputs!r}), t.Path({out!r}), {engine!r})
sys.exit(result.exit_code)
"""


def test_an_interrupted_ray_run_resumes_with_either_engine(cluster, digits, inputs, local_run, tmp_path):
    gate, out = tmp_path / "gate", tmp_path / "out"
    held = min(p.relative_to(inputs).as_posix() for p in (inputs / "0").iterdir())  # the first batch
    method = {"method": "gated", "gate": str(gate), "held": held}
    engine = {"name": "ray", "address": cluster.address}
    script = INTERRUPTED.format(tests=str(Path(__file__).parent), method=method, inputs=str(inputs), out=str(out),
                                engine=engine, model=str(digits.torchscript))
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        run = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stderr=stderr)
        while not list((out / "arrays").rglob("*.npz")):  # the held batch keeps the run going until the signal
            assert run.poll() is None, log.read_text()
            time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=300) == 130, log.read_text()
    gate.write_text("open")
    first = manifest(out)
    assert first["interrupted"] is True
    finished = {p: p.stat().st_mtime_ns for p in out.rglob("*.npz")}
    assert 0 < len(finished) < 20 and first["counts"]["done"] == len(finished)  # a file exactly for each input done
    assert not (out / ".xai" / "staging").exists()  # what actors staged for batches never taken is gone
    for name, engine_ in (("local", {"name": "local"}), ("ray", engine)):
        again = tmp_path / name
        shutil.copytree(out, again)
        result = explain(method, str(digits.torchscript), inputs, again, engine_)
        assert result.manifest["counts"] == {"done": 20 - len(finished), "skipped": len(finished), "failed": 2}
        assert {p: (again / p.relative_to(out)).stat().st_mtime_ns for p in finished} == finished
        ours, reference = relevance(again, "saliency"), relevance(local_run, "saliency")
        assert sorted(ours) == sorted(reference) and all(np.array_equal(ours[k], reference[k]) for k in reference)


def test_engine_options_are_checked_and_a_missing_ray_is_named(digits, inputs, tmp_path, monkeypatch):
    from xaicli.plan import make_plan
    from xaicli.recipe import RecipeError

    with pytest.raises(RecipeError, match="engine.actors"):
        make_plan(from_mapping({"model": str(digits.torchscript), "inputs": [str(inputs)], "methods": {"saliency": {}},
                                "engine": {"name": "ray", "actors": 0}}, registry=default_registry()), default_registry())
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'xaicli\[ray\]'"):
        explain({}, str(digits.torchscript), inputs, tmp_path / "out", {"name": "ray"}, reg=default_registry())


class _FailingSink:
    """A per-input sink that fails as told: a full disk (StorageError) or a bad file (ValueError)."""

    def __init__(self, error: Exception):
        self.error = error

    def write(self, batch) -> None:
        raise self.error


def test_an_actor_write_failure_fails_its_inputs_and_a_full_disk_stops_the_run():
    """The actor-side writes (no cluster needed): a sink's error fails the batch's inputs with the
    writer named; a full disk is handed back to the driver, which stops the run (exit code 3)."""
    import errno

    from xaicli.compute import BatchResult
    from xaicli.descriptors import BatchOutput, InputItem
    from xaicli.engines.ray import _Worker
    from xaicli.errors import StorageError

    items = [InputItem(Path(f"/in/{i}.png"), f"{i}.png", str(i)) for i in range(2)]
    zeros = np.zeros((2, 1, 4, 4), np.float32)
    output = BatchOutput("saliency", "saliency", {}, items, zeros, [], [], [], np.zeros(2, np.int64),
                         np.zeros(2, np.float32), np.zeros(2, np.float32), zeros, scores={"m": np.ones(2)})
    worker = _Worker.__new__(_Worker)
    worker.sinks, worker.staging = {"png": _FailingSink(ValueError("cannot encode"))}, Path("/out/.xai/staging/a")
    result = BatchResult(items, outputs=[output])
    assert worker._write(result) == ""
    assert result.staged == "/out/.xai/staging/a"
    assert [(f.item.relpath, f.stage, f.cause) for f in result.failures] == [
        (f"{i}.png", "write (png)", "ValueError: cannot encode") for i in range(2)]
    assert result.written == ("png",) and result.outputs[0].relevance.size == 0  # arrays stay on the actor
    assert list(result.outputs[0].scores["m"]) == [1, 1]  # scores go to the driver (metrics.csv)
    worker.sinks = {"npz": _FailingSink(StorageError("/out/arrays: no space left on device", "/out", errno.ENOSPC))}
    assert worker._write(BatchResult(items, outputs=[output])) == "/out/arrays: no space left on device"
