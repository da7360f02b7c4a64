"""The run at scale on one machine: several replicas, chunks sized against memory, out-of-memory retries."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

import xaicli
from xaicli import Attribution, Method, hookimpl
from xaicli.api import run_recipe
from xaicli.chunking import chunked, max_batch_param
from xaicli.recipe import from_mapping
from xaicli.registry import create_registry

METHODS = {"saliency": {}, "occlusion": {"window": 8, "stride": 4}, "lrp": {}}


def files(out: Path, params: bool = True) -> dict[str, bytes]:
    """Every heatmap and array of a run, by relative path; NPZ files as their arrays' bytes, without
    the recorded method parameters unless `params` (runs that differ only in max_batch record it)."""
    found = {}
    for path in sorted(p for sub in ("heatmaps", "arrays") for p in (out / sub).rglob("*") if p.is_file()):
        key = path.relative_to(out).as_posix()
        if path.suffix == ".npz" and not params:
            with np.load(path, allow_pickle=False) as npz:
                found[key] = b"".join(k.encode() + npz[k].tobytes() for k in sorted(npz.files) if k != "params")
        else:
            found[key] = path.read_bytes()
    return found


def test_two_cpu_replicas_give_the_outputs_of_one(digits, tmp_path):
    one = xaicli.explain(digits.torchscript, digits.images, methods=METHODS, output=tmp_path / "one", batch_size=4)
    two = xaicli.explain(digits.torchscript, digits.images, methods=METHODS, output=tmp_path / "two", batch_size=4,
                         device="cpu,cpu")
    assert one.exit_code == two.exit_code == 0
    assert two.manifest["engine"]["devices"] == ["cpu", "cpu"]
    assert one.manifest["counts"] == two.manifest["counts"] == {"done": 20, "skipped": 0, "failed": 0}
    a, b = files(tmp_path / "one"), files(tmp_path / "two")
    assert len(a) == 20 * 3 * 2 and a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_auto_chunks_under_a_memory_budget_equal_fixed_chunks_and_are_recorded(digits, tmp_path, monkeypatch):
    methods = {"occlusion": {"window": 4, "stride": 2}, "ig": {"method": "integrated_gradients", "steps": 48}}
    fixed = {k: {**v, "max_batch": 8} for k, v in methods.items()}
    xaicli.explain(digits.torchscript, digits.images, methods=fixed, output=tmp_path / "fixed", writers={"npz": {}})
    monkeypatch.setenv("XAI_MEMORY_BUDGET", "4M")  # the probes size chunks against 4 MB, not the machine's RAM
    auto = xaicli.explain(digits.torchscript, digits.images, methods={k: {**v, "max_batch": "auto"} for k, v in methods.items()},
                          output=tmp_path / "auto", writers={"npz": {}}, batch_size="auto")
    assert auto.exit_code == 0
    chunks = json.loads((tmp_path / "auto" / "run.json").read_text())["engine"]["chunks"]
    assert set(chunks) >= {"occlusion@cpu", "integrated_gradients@cpu"}, chunks
    assert all(8 <= size <= 256 and size % 8 == 0 for size in chunks.values()), chunks
    assert auto.manifest["engine"]["batch_size"] == 16
    assert files(tmp_path / "fixed", params=False) == files(tmp_path / "auto", params=False)


def _oom_method(limit: int):
    """A method whose work runs out of memory (torch's own exception type) above `limit` rows."""

    def explain(model, x, target, rng, max_batch="auto"):
        rows = x.repeat_interleave(4, 0)

        def work(start: int, stop: int) -> torch.Tensor:
            if stop - start > limit:
                raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {stop - start} rows")
            return rows[start:stop] * 2.0

        out = torch.cat(chunked(work, len(rows), max_batch, key="hungry", device=model.device))
        return Attribution(out.view(len(x), 4, *x.shape[1:]).mean(1))

    plugin = SimpleNamespace(xai_methods=hookimpl(lambda: [
        Method("hungry", "runs out of memory above a few rows", explain, (max_batch_param("rows per chunk"),), needs="forward")]))
    return plugin


def test_out_of_memory_halves_the_chunk_and_the_run_records_the_size(digits, tmp_path):
    registry = create_registry(extra=[_oom_method(limit=12)])
    runs = {}
    for name, max_batch in (("auto", "auto"), ("big", 64), ("small", 8)):
        recipe = from_mapping({"model": str(digits.torchscript), "inputs": [str(digits.images)],
                               "output": str(tmp_path / name), "methods": {"hungry": {"max_batch": max_batch}},
                               "writers": {"npz": {}}}, registry=registry)
        runs[name] = run_recipe(recipe, registry=registry)
        assert runs[name].exit_code == 0, runs[name].errors
    assert runs["big"].manifest["engine"]["chunks"] == {"hungry@cpu": 8}  # 64 -> 32 -> 16 -> 8 rows
    assert runs["auto"].manifest["engine"]["chunks"]["hungry@cpu"] <= 12
    assert files(tmp_path / "big", False) == files(tmp_path / "small", False) == files(tmp_path / "auto", False)
    relevance = np.load(next((tmp_path / "small" / "arrays" / "hungry").rglob("*.npz")))["relevance"]
    assert np.isfinite(relevance).all() and np.abs(relevance).max() > 0
