"""What each method output in a folder was made with, so a rerun reuses only matching outputs.

A run writes `<out>/.xai/outputs.json` before its first output file: per method output (the
recipe's name under `methods:`) the method plugin, its resolved parameters, the model digest,
the preprocessing, the seed (and, for information, the xai version). The next run into the folder compares its own
record with it: outputs made with other settings are refused (or, with --overwrite, recomputed)
instead of being skipped as finished. Folders written before this record existed are compared
with their run.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from . import __version__
from .errors import UsageError
from .io import atomic_write_json

if TYPE_CHECKING:
    from .model import InputSpec

RECORD = Path(".xai") / "outputs.json"
UNSET = object()  # a parameter one record has and the other has not
UNCOMPARED_PARAMS = frozenset({"max_batch"})  # batching knobs: results are batch-invariant (kept, not compared)


def preprocess_record(spec: "InputSpec") -> dict[str, Any]:
    """The model input spec as run.json (`model.input`) and the output records store it."""
    return {"size": list(spec.size), "channels": spec.channels, "mean": list(spec.mean), "std": list(spec.std),
            "interpolation": spec.interpolation, "crop_pct": spec.crop_pct}


def output_record(method: str, params: Mapping[str, Any], model_digest: str, preprocess: Mapping[str, Any],
                  seed: int) -> dict[str, Any]:
    """The record of one method output, in the JSON form it is stored in."""
    return _plain({"method": method, "params": dict(params), "model": model_digest,
                   "preprocess": dict(preprocess), "seed": seed, "xai": __version__})


@dataclass(frozen=True)
class Change:
    """A method output whose stored record differs from this run's; `differences` read like `window 16 -> 8`."""

    output: str
    differences: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.output}: {', '.join(self.differences)}"


def read_records(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The stored records (from run.json for older folders); {} for a new folder."""
    path = Path(out_dir) / RECORD
    if path.exists():
        try:
            records = json.loads(path.read_text())["outputs"]
            if isinstance(records, dict) and all(isinstance(r, dict) for r in records.values()):
                return records
            raise ValueError("'outputs' is not a mapping of records")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{path} is unreadable ({type(exc).__name__}: {exc}); remove it and pass --overwrite "
                             "to recompute every output") from None
    return _from_manifest(Path(out_dir) / "run.json")


def _from_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """Records of a run.json written before outputs.json existed (an unreadable one gives none)."""
    try:
        run = json.loads(path.read_text())
        methods, model = run["recipe"]["methods"], run["model"]
        preprocess = model.get("input", {})
        return {out: output_record(p["method"], {k: v for k, v in p.items() if k != "method"}, model["digest"],
                                   preprocess, run["seed"])
                for out, p in methods.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def compare_provenance(out_dir: Path, current: Mapping[str, Mapping[str, Any]]) -> list[Change]:
    """The outputs of this run (`current`: output name -> output_record) whose stored record differs."""
    stored = read_records(out_dir)
    changes = []
    for out, record in current.items():
        if out in stored:
            differences = _differences(stored[out], dict(record))
            if differences:
                changes.append(Change(out, tuple(differences)))
    return changes


def check_provenance(out_dir: Path, current: Mapping[str, Mapping[str, Any]], overwrite: bool) -> list[str]:
    """Refuse outputs made with other settings unless `overwrite`; return the outputs to recompute.

    The caller deletes the changed outputs' files of this run's inputs before `write_provenance`,
    so that an interrupted --overwrite run leaves no stale file that a rerun would take as finished.
    """
    changes = compare_provenance(out_dir, current)
    if changes and not overwrite:
        raise UsageError(f"output folder {out_dir} holds outputs made with other settings ("
                         + "; ".join(map(str, changes))
                         + "): pass --overwrite to recompute them, or choose another --output")
    return [c.output for c in changes]


def write_provenance(out_dir: Path, current: Mapping[str, Mapping[str, Any]]) -> None:
    """Store this run's records (before its first output file), keeping other outputs' records."""
    path = Path(out_dir) / RECORD
    stored = {} if not path.exists() else read_records(out_dir)
    merged = {**stored, **{out: dict(r) for out, r in current.items()}}
    atomic_write_json(path, {"version": 1, "outputs": merged}, root=Path(out_dir))


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    found = []
    if old.get("method") != new.get("method"):
        found.append(f"method {_show(old.get('method'))} -> {_show(new.get('method'))}")
    params = [{k: v for k, v in (r.get("params") or {}).items() if k not in UNCOMPARED_PARAMS} for r in (old, new)]
    found += _mapping_differences(*params, "")
    if old.get("model") != new.get("model"):
        found.append(f"model digest {_short(old.get('model'))} -> {_short(new.get('model'))}")
    found += _mapping_differences(old.get("preprocess") or {}, new.get("preprocess") or {}, "preprocess.")
    if old.get("seed") != new.get("seed"):
        found.append(f"seed {_show(old.get('seed'))} -> {_show(new.get('seed'))}")
    return found


def _mapping_differences(old: dict[str, Any], new: dict[str, Any], prefix: str) -> list[str]:
    return [f"{prefix}{k} {_show(old.get(k, UNSET))} -> {_show(new.get(k, UNSET))}"
            for k in sorted(set(old) | set(new)) if _key(old.get(k, UNSET)) != _key(new.get(k, UNSET))]


def _plain(value: Any) -> Any:
    """JSON-shaped copy (tuples become lists, paths strings), so stored and current records compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _key(value: Any) -> str:
    """Equality by canonical JSON text (so NaN equals NaN)."""
    return "<unset>" if value is UNSET else json.dumps(_plain(value), sort_keys=True)


def _show(value: Any) -> str:
    if value is UNSET:
        return "(unset)"
    return value if isinstance(value, str) else json.dumps(_plain(value))


def _short(digest: Any) -> str:
    return str(digest)[:12] if digest else "(none)"
