"""`xaicli.npz.read_npz`: the arrays np.load gives, no pickles, and safe from many threads at once
(numpy parses headers with ast.literal_eval, which CPython 3.11 cannot run in two threads at once)."""
from __future__ import annotations

import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from xaicli.npz import npz_keys, read_npz


def test_same_arrays_as_numpy(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"relevance": rng.normal(size=(3, 8, 8)).astype(np.float32), "target": np.int64(4),
              "fortran": np.asfortranarray(rng.normal(size=(5, 7))), "label:b": np.array(["a", "bc"])}
    path = tmp_path / "a.npz"
    np.savez(path, **arrays)
    with np.load(path) as expected:
        got = read_npz(path)
        assert sorted(got) == sorted(expected.files) == sorted(npz_keys(path))
        for key in expected.files:
            np.testing.assert_array_equal(got[key], expected[key])
            assert got[key].dtype == expected[key].dtype
    assert sorted(read_npz(path, ("target", "missing"))) == ["target"]
    assert read_npz(path)["relevance"].flags.writeable


def test_refuses_pickles_and_broken_files(tmp_path):
    pickled = tmp_path / "p.npz"
    np.savez(pickled, obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        read_npz(pickled)
    broken = tmp_path / "b.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(zipfile.BadZipFile):
        read_npz(broken)
    truncated = tmp_path / "t.npz"
    np.savez(truncated, x=np.arange(1000.0))
    truncated.write_bytes(truncated.read_bytes()[:600])
    with pytest.raises((zipfile.BadZipFile, EOFError, ValueError, OSError)):
        read_npz(truncated)


def test_many_threads_read_at_once(tmp_path):
    paths = []
    for i in range(64):
        paths.append(tmp_path / f"{i}.npz")
        np.savez(paths[-1], relevance=np.full((2, 4, 4), i, np.float32), target=np.int64(i))
    with ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            got = list(pool.map(read_npz, paths))
            assert [int(g["target"]) for g in got] == list(range(64))
            assert all(float(g["relevance"].mean()) == i for i, g in enumerate(got))
