"""Finished outputs are reused only when they were made with the same method, parameters and model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xaicli.errors import UsageError
from xaicli.model import InputSpec
from xaicli.provenance import (
    RECORD, Change, check_provenance, compare_provenance, output_record, preprocess_record, read_records,
    write_provenance,
)

SPEC = preprocess_record(InputSpec(size=(32, 32), channels=1, mean=(0.5,), std=(0.25,)))


def occlusion(window=16, digest="a" * 64, seed=0, spec=SPEC, **extra) -> dict:
    return output_record("occlusion", {"window": window, "stride": 8, "baseline": 0.0, **extra}, digest, spec, seed)


def test_changed_parameter_is_named_with_old_and_new_value(tmp_path):
    write_provenance(tmp_path, {"occlusion": occlusion(16)})
    assert compare_provenance(tmp_path, {"occlusion": occlusion(16)}) == []
    changes = compare_provenance(tmp_path, {"occlusion": occlusion(8)})
    assert changes == [Change("occlusion", ("window 16 -> 8",))]
    assert str(changes[0]) == "occlusion: window 16 -> 8"


def test_every_compared_field_is_reported(tmp_path):
    write_provenance(tmp_path, {"occlusion": occlusion(16)})
    other_spec = {**SPEC, "size": [28, 28]}
    [change] = compare_provenance(tmp_path, {"occlusion": occlusion([8, 4], "b" * 64, 1, other_spec, sigma=2.0)})
    assert change.differences == (
        "sigma (unset) -> 2.0", "window 16 -> [8, 4]", f"model digest {'a' * 12} -> {'b' * 12}",
        "preprocess.size [32, 32] -> [28, 28]", "seed 0 -> 1",
    )
    renamed = output_record("saliency", {"window": 16, "stride": 8, "baseline": 0.0}, "a" * 64, SPEC, 0)
    assert compare_provenance(tmp_path, {"occlusion": renamed})[0].differences == ("method occlusion -> saliency",)


def test_xai_version_batching_knobs_and_json_shapes_do_not_count_as_changes(tmp_path):
    stored = occlusion(window=(8, 8), baseline=float("nan"), max_batch=64)
    write_provenance(tmp_path, {"occlusion": {**stored, "xai": "0.0.1"}})
    current = occlusion(window=[8, 8], baseline=float("nan"), max_batch=4)
    assert compare_provenance(tmp_path, {"occlusion": current}) == []


def test_changes_are_refused_without_overwrite_and_listed_with_it(tmp_path):
    write_provenance(tmp_path, {"occlusion": occlusion(16), "saliency": output_record("saliency", {}, "a" * 64, SPEC, 0)})
    current = {"occlusion": occlusion(8), "saliency": output_record("saliency", {}, "a" * 64, SPEC, 0)}
    with pytest.raises(UsageError) as caught:
        check_provenance(tmp_path, current, overwrite=False)
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "occlusion: window 16 -> 8" in message and "--overwrite" in message and "saliency" not in message
    assert check_provenance(tmp_path, current, overwrite=True) == ["occlusion"]


def test_new_outputs_are_added_and_others_kept(tmp_path):
    assert check_provenance(tmp_path, {"occlusion": occlusion(16)}, overwrite=False) == []  # empty folder
    write_provenance(tmp_path, {"occlusion": occlusion(16)})
    write_provenance(tmp_path, {"occ8": occlusion(8)})
    records = read_records(tmp_path)
    assert set(records) == {"occlusion", "occ8"} and records["occlusion"]["params"]["window"] == 16
    assert json.loads((tmp_path / RECORD).read_text())["version"] == 1


def test_unreadable_record_is_a_usage_error_naming_the_file(tmp_path):
    (tmp_path / RECORD).parent.mkdir()
    for text in ("{not json", '{"outputs": [1, 2]}', "[]", '{"outputs": {"occlusion": 3}}'):
        (tmp_path / RECORD).write_text(text)
        with pytest.raises(UsageError, match=r"outputs\.json is unreadable"):
            compare_provenance(tmp_path, {"occlusion": occlusion()})


def test_folder_without_record_is_compared_with_its_run_json(tmp_path):
    manifest = {"recipe": {"methods": {"occlusion": {"method": "occlusion", "window": 16, "stride": 8, "baseline": 0.0}}},
                "model": {"digest": "a" * 64, "input": SPEC}, "seed": 0}
    (tmp_path / "run.json").write_text(json.dumps(manifest))
    assert compare_provenance(tmp_path, {"occlusion": occlusion(16)}) == []
    assert [str(c) for c in compare_provenance(tmp_path, {"occlusion": occlusion(8)})] == ["occlusion: window 16 -> 8"]
    (tmp_path / "run.json").write_text("{broken")
    assert compare_provenance(tmp_path, {"occlusion": occlusion(8)}) == []  # nothing known: nothing to refuse


# -- end to end, through the CLI ------------------------------------------------------------
XAI = [sys.executable, "-m", "xaicli.cli"]


def xai(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*XAI, *map(str, args)], capture_output=True, text=True)


def windows(out: Path) -> set[int]:
    found = set()
    for path in (out / "arrays" / "occlusion").rglob("*.npz"):
        with np.load(path, allow_pickle=False) as npz:
            found.add(json.loads(str(npz["params"]))["window"])
    return found


def test_rerun_with_changed_parameters_is_refused_then_recomputed_with_overwrite(digits, tmp_path):
    out = tmp_path / "out"
    first = xai("explain", digits.torchscript, digits.images, "-m", "occlusion", "--set", "methods.occlusion.window=16",
                "-o", out, "-q")
    assert first.returncode == 0, first.stderr
    assert windows(out) == {16}
    changed = xai("explain", digits.torchscript, digits.images, "-m", "occlusion", "--set", "methods.occlusion.window=8",
                  "-o", out, "-q")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "occlusion: window 16 -> 8" in changed.stderr and "--overwrite" in changed.stderr
    assert windows(out) == {16}
    redone = xai("explain", digits.torchscript, digits.images, "-m", "occlusion", "--set", "methods.occlusion.window=8",
                 "-o", out, "-q", "--overwrite")
    assert redone.returncode == 0, redone.stderr
    assert windows(out) == {8}
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["recipe"]["methods"]["occlusion"]["window"] == 8
    assert read_records(out)["occlusion"]["params"]["window"] == 8
    same = xai("explain", digits.torchscript, digits.images, "-m", "occlusion", "--set", "methods.occlusion.window=8",
               "-o", out, "-q")
    assert same.returncode == 0 and json.loads((out / "run.json").read_text())["counts"]["done"] == 0
