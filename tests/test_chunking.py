"""Chunked row-wise work (xaicli.chunking): out-of-memory errors of the real types are caught and the
chunk halved, `auto` sizes against a memory budget, and results never depend on the chunk size."""
from __future__ import annotations

import pytest
import torch

from xaicli.chunking import (
    AUTO, FALLBACK, ROWS, ChunkSizer, _counter, _PEAKS, cgroup_free, chunked, current_sizer, fit_size,
    free_memory, is_out_of_memory, parse_bytes, predict_rows,
)
from xaicli.errors import UsageError
from xaicli.model import InputSpec, Model
from xaicli.params import ParamErrors, resolve
from xaicli.registry import default_registry
from xaicli.rng import BatchRNG
from xaicli_plugins.methods.integrated_gradients import integrated_gradients
from xaicli_plugins.methods.occlusion import occlusion

MIB = 2**20
CPU = torch.device("cpu")
measurable = pytest.mark.skipif(_counter(CPU) is None, reason="peak resident memory is not readable here (not Linux)")


def cuda_oom(rows: int) -> None:
    raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {rows} GiB")


def cpu_allocator_oom(rows: int) -> None:
    torch.empty(rows * 2**44, dtype=torch.uint8)  # 16 TiB a row: the real DefaultCPUAllocator error


def python_oom(rows: int) -> None:
    raise MemoryError()


class Rows:
    """A row-wise computation (row i -> i² + 1) that runs out of memory above `limit` rows."""

    def __init__(self, limit: int, fail=cuda_oom):
        self.limit, self.fail, self.seen = limit, fail, []

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        self.seen.append(stop - start)
        if stop - start > self.limit:
            self.fail(stop - start)
        return torch.arange(start, stop) ** 2 + 1


@pytest.mark.parametrize("fail", [cuda_oom, cpu_allocator_oom, python_oom])
@pytest.mark.parametrize("max_batch", [64, AUTO])
def test_out_of_memory_halves_the_chunk_and_the_run_remembers_it(fail, max_batch):
    sizer, rows = ChunkSizer(budget=2**40), Rows(20, fail)
    with sizer.active():
        out = torch.cat(chunked(rows, 300, max_batch, key="rows", device="cpu"))
        assert torch.equal(out, torch.cat(chunked(Rows(300), 300, 5, key="fixed", device="cpu")))
        assert sizer.sizes()["rows@cpu"] == 16
        assert rows.seen[:2] == ([64, 32] if max_batch == 64 else [8, 16])  # auto: probes of 8 and 16 rows first
        first = rows.seen.index(16, 2)  # the size that fitted, after one or more failures
        assert max(rows.seen[:first]) > 20 and max(rows.seen[first:]) <= 16
        rows.seen.clear()
        again = torch.cat(chunked(rows, 40, max_batch, key="rows", device="cpu"))
    assert torch.equal(again, out[:40]) and rows.seen == [16, 16, 8]  # remembered: no second failure
    assert "rows@cpu" not in current_sizer().sizes()  # the run's sizer, not the process default


def test_halving_goes_down_to_one_row_then_the_error_propagates():
    rows = Rows(0, cpu_allocator_oom)
    with ChunkSizer().active(), pytest.raises(RuntimeError, match="DefaultCPUAllocator: can't allocate memory"):
        chunked(rows, 30, 24, key="rows", device="cpu")
    assert rows.seen == [24, 8, 4, 2, 1]


def test_other_errors_are_not_retried():
    rows = Rows(0, lambda n: (_ for _ in ()).throw(ValueError("bad input")))
    with ChunkSizer().active(), pytest.raises(ValueError, match="bad input"):
        chunked(rows, 30, 16, key="rows", device="cpu")
    assert rows.seen == [16]
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] not enough memory: you tried to allocate 1 bytes"))


def grow(start: int, stop: int) -> torch.Tensor:
    """4 MiB of touched memory a row (chunks of 8 rows or more are mmap'd: exact in the resident set)."""
    return torch.ones(stop - start, MIB).sum(1) * torch.arange(start, stop)


@measurable
def test_a_cpu_budget_forces_chunks_with_the_outputs_of_a_fixed_size(monkeypatch):
    seen = []

    def rows(start: int, stop: int) -> torch.Tensor:
        seen.append(stop - start)
        return grow(start, stop)

    monkeypatch.setenv("XAI_MEMORY_BUDGET", "100M")  # 25 rows of 4 MiB
    sizer = ChunkSizer()
    with sizer.active():
        out = torch.cat(chunked(rows, 200, AUTO, key="grow", device="cpu"))
    size = sizer.sizes()["grow@cpu"]
    assert size % ROWS == 0 and 8 <= size <= 24, size
    assert seen[:2] == [8, 16] and set(seen[2:-1]) == {size}
    assert torch.equal(out, torch.cat(chunked(grow, 200, 7, key="grow7", device="cpu")))


def test_fit_size_extrapolates_two_probes_to_the_target():
    # peak = 10 MiB fixed + 1 MiB a row: (100 − 10) / 1 = 90 rows -> 88
    assert fit_size([(8, 18 * MIB), (16, 26 * MIB)], 100 * MIB, cap=256) == 88
    assert fit_size([(8, 18 * MIB), (16, 26 * MIB)], 100 * MIB, cap=64) == 64
    # noisy readings (the bigger chunk read less): the bound max(p/n) = 2.25 MiB a row, no fixed part
    assert fit_size([(8, 18 * MIB), (16, 17 * MIB)], 100 * MIB, cap=256) == 40
    assert fit_size([(8, 0), (16, 0)], 100 * MIB, cap=256) == FALLBACK  # nothing measurable
    assert fit_size([(8, 8 * MIB), (16, 16 * MIB)], 1, cap=256) == ROWS  # never below the probed rows


@measurable
def test_nested_readings_keep_the_outer_peak():
    """Sizes above glibc's largest mmap threshold (32 MiB): mapped and unmapped, exact in the resident set."""
    outer = _PEAKS.open(CPU)
    big = torch.ones(32 * MIB)  # 128 MiB, freed before the inner reading resets the counter
    del big
    inner = _PEAKS.open(CPU)
    small = torch.ones(10 * MIB)  # 40 MiB
    inner_peak = _PEAKS.close(inner)
    del small
    outer_peak = _PEAKS.close(outer)
    assert outer_peak >= 120 * MIB and 38 * MIB <= inner_peak < 100 * MIB


def test_free_memory_reads_cgroup_limits_and_the_budget_parses(tmp_path, monkeypatch):
    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("268435456\n")
    assert cgroup_free(tmp_path) == 768 * MIB
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_free(tmp_path) is None
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2**30))
    (v1 / "memory" / "memory.usage_in_bytes").write_text(str(2**29))
    assert cgroup_free(v1) == 512 * MIB
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712")  # v1's "no limit"
    assert cgroup_free(v1) is None
    assert free_memory(CPU) is None or free_memory(CPU) > 0
    assert (parse_bytes("512M"), parse_bytes("1.5G"), parse_bytes("4096"), parse_bytes("2GiB")) == (
        512 * MIB, 1536 * MIB, 4096, 2048 * MIB)
    monkeypatch.setenv("XAI_MEMORY_BUDGET", "lots")
    with pytest.raises(UsageError, match="XAI_MEMORY_BUDGET.*512M"):
        ChunkSizer().target(CPU)


def test_every_chunking_plugin_takes_auto_or_a_number_of_rows():
    tables = default_registry().plugins
    plugins = [*tables["method"].values(), *tables["metric"].values()]
    chunking = {p.name for p in plugins if any(q.name == "max_batch" for q in p.params)}
    assert {"occlusion", "integrated_gradients", "lime", "gradcam", "smoothgrad", "meaningful_perturbation",
            "pixel_flipping", "road", "mprt", "max_sensitivity", "completeness"} <= chunking
    for plugin in (p for p in plugins if p.name in chunking):
        assert resolve(plugin.params, {})["max_batch"] == AUTO, plugin.name
        assert resolve(plugin.params, {"max_batch": 12})["max_batch"] == 12
        with pytest.raises(ParamErrors, match="max_batch: expected a number of rows or 'auto'"):
            resolve(plugin.params, {"max_batch": "many"})
        with pytest.raises(ParamErrors, match="max_batch: must be >= 1"):
            resolve(plugin.params, {"max_batch": 0})


@pytest.fixture(scope="module")
def wide() -> Model:
    """A random CNN on 160×160 inputs: 6.25 MiB of activation a row, so probes read real growth."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    return Model("wide", InputSpec(size=(160, 160)), CPU, module=net)


@measurable
def test_budget_sized_occlusion_and_ig_equal_fixed_chunks(wide, monkeypatch):
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    t, rng = torch.tensor([3, 7]), BatchRNG([0, 1])
    monkeypatch.setenv("XAI_MEMORY_BUDGET", "200M")
    sizer = ChunkSizer()
    with sizer.active():
        occluded = occlusion(wide, x, t, rng, window=20, stride=20).relevance  # 2 × 64 occluded rows
        ig = integrated_gradients(wide, x, t, rng, steps=40).relevance  # 80 path points
    sizes = sizer.sizes()
    for key in ("occlusion@cpu", "integrated_gradients@cpu"):
        assert sizes[key] % ROWS == 0 and ROWS <= sizes[key] <= 48, sizes
    assert torch.equal(occluded, occlusion(wide, x, t, rng, window=20, stride=20, max_batch=64).relevance)
    assert torch.equal(ig, integrated_gradients(wide, x, t, rng, steps=40, max_batch=64).relevance)


def test_auto_and_fixed_sizes_give_identical_arrays_on_digits(digits, monkeypatch):
    model = Model("digits", digits.spec, CPU, module=digits.module)
    x, t, rng = digits.x[:6], digits.y[:6], BatchRNG(range(6))
    monkeypatch.setenv("XAI_MEMORY_BUDGET", "1")  # the least size: chunks of 8 rows
    sizer = ChunkSizer()
    with sizer.active():
        auto = [occlusion(model, x, t, rng, window=8, stride=4).relevance,  # 294 occluded rows
                integrated_gradients(model, x, t, rng, steps=12).relevance,  # 72 path points
                predict_rows(model, torch.cat([x] * 4), AUTO)]
    assert sizer.sizes() == {"occlusion@cpu": 8, "integrated_gradients@cpu": 8, "forward@cpu": 8}
    for size in (64, 16):
        fixed = [occlusion(model, x, t, rng, window=8, stride=4, max_batch=size).relevance,
                 integrated_gradients(model, x, t, rng, steps=12, max_batch=size).relevance,
                 predict_rows(model, torch.cat([x] * 4), size)]
        assert all(torch.equal(a, b) for a, b in zip(auto, fixed)), size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_cuda_allocator_running_out_of_memory_is_caught_and_halved():
    device = torch.device("cuda", torch.cuda.current_device())
    per_row = free_memory(device) // 24  # 64 rows: 2.7× what is free; 32: 1.3×; 16: 0.67×
    seen = []

    def rows(start: int, stop: int) -> torch.Tensor:
        seen.append(stop - start)
        block = torch.ones((stop - start, per_row), dtype=torch.uint8, device=device)
        return block[:, :4].sum(1).cpu() + torch.arange(start, stop)

    sizer = ChunkSizer()
    with sizer.active():
        out = torch.cat(chunked(rows, 64, 64, key="fill", device=device))
        assert seen[:3] == [64, 32, 16] and sizer.sizes() == {f"fill@{device}": 16}
        seen.clear()
        auto = torch.cat(chunked(rows, 64, AUTO, key="probe", device=device))  # probe: 8 rows ~1/3 free, 16 ~2/3
    assert torch.equal(out, torch.arange(64) + 4) and torch.equal(auto, out)
    assert seen[:2] == [8, 16] and sizer.sizes()[f"probe@{device}"] == 8  # half of free: 12 rows -> 8
