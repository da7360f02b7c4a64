"""Part 3: kill `xai explain` at a seeded moment, rerun it, and compare with an uninterrupted run.

Inputs: the 20 demo digits, 20 seeded variants of them and two corrupt files; methods saliency and
gradient_x_input; batch size 1, so that a resumed run computes every input in the same batch shape as
the reference (README: results agree across batch sizes only to float rounding).
Each trial sends SIGINT, SIGTERM, SIGINT twice, or SIGKILL, either a seeded time after the start
or once a seeded number of output files exist, then checks:
- the interrupted run: no traceback, no hang, exit 130 (SIGINT/SIGTERM) or killed (SIGKILL), and
  no `*.tmp` left after a signal it can handle;
- the rerun of the same command: exit as the reference, no traceback; run.json counts
  skipped == inputs finished before the kill, done + skipped + failed == inputs; files of inputs
  finished before the kill untouched (same inode and mtime); every file under heatmaps/ and arrays/
  byte-identical to the reference, none missing or extra; errors.jsonl the same lines; run.json
  the same recipe (output folder aside), model, seed and input count; no `*.tmp` left.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .launch import Job, Proc, Task, run, run_all, sleep
from .report import Tally, errors_lines, tree

METHODS = ("saliency", "gradient_x_input")
WRITERS = (("heatmaps", "png"), ("arrays", "npz"))
TIMEOUT = 180.0  # a whole run, interrupted or not
LIMIT = f"{TIMEOUT:.0f} s"
SIGNALS = ("SIGINT", "SIGTERM", "SIGINT x2", "SIGKILL")
RUN_JSON_SAME = ("xai", "seed", "model", "inputs", "versions", "thresholds")


@dataclass(frozen=True)
class Trial:
    index: int
    signal: str
    after_files: int | None  # send once this many output files exist ...
    after_seconds: float  # ... plus this delay (or this delay after the start when after_files is None)
    second: float  # SIGINT x2: delay of the second SIGINT

    @property
    def name(self) -> str:
        when = f"after {self.after_files} files + {self.after_seconds:.2f}s" if self.after_files is not None \
            else f"{self.after_seconds:.2f}s after start"
        return f"trial{self.index:02d} {self.signal} {when}"


@dataclass
class Reference:
    files: dict[str, bytes]  # heatmaps/ and arrays/ relpath -> bytes
    errors: list[str]
    manifest: dict
    rc: int
    stems: list[str]  # stems of the inputs that have outputs


def inputs(folder: Path, demo: Path, seed: int) -> tuple[int, int]:
    """Valid digits and their seeded variants, plus two corrupt files; (inputs, corrupt ones)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    sources = sorted((demo / "images").rglob("*.png"))
    for i, source in enumerate(sources):
        im = Image.open(source).convert("L")
        im.save(folder / f"d{i:02d}.png")
        variant = im.rotate(rng.uniform(-30, 30)).filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))
        noise = np.random.default_rng(rng.randrange(2**32)).integers(0, 40, (im.height, im.width))
        Image.fromarray(np.clip(np.asarray(variant, dtype=np.int64) + noise, 0, 255).astype(np.uint8)).save(folder / f"v{i:02d}.png")
    data = (folder / "d00.png").read_bytes()
    (folder / "corrupt_truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "corrupt_junk.jpg").write_bytes(bytes(rng.randrange(256) for _ in range(500)))
    return 2 * len(sources) + 2, 2


def explain_args(model: Path, folder: Path, out: Path) -> list[str]:
    return ["explain", str(model), str(folder), "-m", METHODS[0], "-m", METHODS[1], "-o", str(out), "-b", "1",
            "--workers", "2", "--quiet"]


def trials(seed: int, n: int, total_files: int) -> list[Trial]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        by_files = rng.random() < 0.6
        out.append(Trial(i, SIGNALS[i % len(SIGNALS)], rng.randint(1, total_files - 1) if by_files else None,
                         rng.uniform(0, 0.05) if by_files else rng.uniform(0, 2.0), rng.uniform(0, 0.3)))
    return out


def run_part(work: Path, seed: int, n: int, demo: Path, tally: Tally, parallel: int) -> None:
    folder = work / "inputs"
    n_inputs, n_corrupt = inputs(folder, demo, seed)
    model = demo / "digits.pt"
    refs: list[Reference] = []
    run_all([reference(model, folder, work, n_inputs, n_corrupt, tally, refs)], 1)
    if not refs:
        return
    total = len(refs[0].files)
    run_all((trial(t, model, folder, work, refs[0], n_inputs, tally) for t in trials(seed, n, total)), parallel)


def reference(model: Path, folder: Path, work: Path, n_inputs: int, n_corrupt: int, tally: Tally, refs: list) -> Task:
    """The uninterrupted run every trial is compared with."""
    out = work / "reference"
    outcome = yield from run(Job(explain_args(model, folder, out), work / "cwd", work / "logs" / "reference.log", TIMEOUT))
    before = len(tally.failing)
    tally.check_run("reference run", outcome, (1,), LIMIT)
    manifest = _manifest(out)
    counts = {k: manifest.get("counts", {}).get(k) for k in ("done", "skipped", "failed")}
    if counts != {"done": n_inputs - n_corrupt, "skipped": 0, "failed": n_corrupt}:
        tally.fail("resume counts", "reference run", f"counts {counts}, expected {n_inputs - n_corrupt} done, {n_corrupt} failed")
    if len(tally.failing) > before:
        return
    files = {rel: p.read_bytes() for rel, p in _outputs(out).items()}
    refs.append(Reference(files, _error_lines(out), manifest, outcome.rc, _stems(files)))


def trial(t: Trial, model: Path, folder: Path, work: Path, ref: Reference, n_inputs: int, tally: Tally) -> Task:
    out = work / "trials" / f"{t.index:02d}"
    args = explain_args(model, folder, out)
    proc = Proc(Job(args, work / "cwd", work / "logs" / f"trial{t.index:02d}.log", TIMEOUT))
    if t.after_files is not None:
        while proc.running() and len(_outputs(out)) < t.after_files:
            yield
    yield from sleep(t.after_seconds)
    at_signal = len(_outputs(out))
    if proc.running():
        proc.kill(signal.SIGKILL if t.signal == "SIGKILL" else signal.SIGTERM if t.signal == "SIGTERM" else signal.SIGINT)
        if t.signal == "SIGINT x2":
            yield from sleep(t.second)
            proc.kill(signal.SIGINT)
    outcome = yield from proc.wait()
    tally.cases += 1
    handled = t.signal != "SIGKILL"
    completed = _completed(_manifest(out), n_inputs)
    expected = (130,) if handled else (-signal.SIGKILL,)
    if completed and outcome.rc in (0, 1):  # the signal came once all work was done (or to a process exiting)
        expected = (0, 1)
        tally.notes["signal after the run completed"] += 1
    tally.check_run(f"{t.name} (interrupted run; {at_signal} output files at the signal)", outcome, expected, LIMIT)
    if outcome.hang:
        return
    temporary = _temporary(out)
    if handled and temporary:
        tally.fail("tmp left", f"{t.name} (interrupted run)", ", ".join(temporary[:3]))
    finished = _finished(out, ref.stems)
    stats = {rel: _stat(p) for rel, p in _outputs(out).items() if _stem_of(rel) in finished}
    tally.notes["inputs finished before the kill (sum)"] += len(finished)
    t0 = time.monotonic()
    rerun = yield from run(Job(args, work / "cwd", work / "logs" / f"trial{t.index:02d}.rerun.log", TIMEOUT))
    tally.notes["rerun seconds (sum)"] += int(time.monotonic() - t0)
    case = f"{t.name} (rerun)"
    tally.check_run(case, rerun, (ref.rc,), LIMIT)
    if rerun.hang:
        return
    _check_counts(case, _manifest(out), ref, len(finished), n_inputs, tally)
    touched = sorted(rel for rel, p in _outputs(out).items() if rel in stats and _stat(p) != stats[rel])
    if touched:
        tally.fail("recomputed", case, f"{len(touched)} files of inputs finished before the kill rewritten, e.g. {touched[0]}")
    _compare(case, out, ref, tally)
    temporary = _temporary(out)
    if temporary and handled:
        tally.fail("tmp left", case, ", ".join(temporary[:3]))
    elif temporary:
        tally.notes["stale .tmp after SIGKILL + rerun (trials)"] += 1


def _check_counts(case: str, manifest: dict, ref: Reference, finished: int, n_inputs: int, tally: Tally) -> None:
    counts = manifest.get("counts", {})
    done, skipped, failed = (counts.get(k, -1) for k in ("done", "skipped", "failed"))
    problems = []
    if skipped != finished:
        problems.append(f"skipped {skipped}, but {finished} inputs were finished before the kill")
    if done + skipped + failed != n_inputs:
        problems.append(f"done {done} + skipped {skipped} + failed {failed} != {n_inputs} inputs")
    if failed != ref.manifest["counts"]["failed"] or manifest.get("interrupted") is not False:
        problems.append(f"failed {failed}, interrupted {manifest.get('interrupted')}")
    if problems:
        tally.fail("resume counts", case, "; ".join(problems))
    same = {k: (manifest.get(k), ref.manifest.get(k)) for k in RUN_JSON_SAME}
    recipe, ref_recipe = (dict(m.get("recipe", {}), output=None) for m in (manifest, ref.manifest))
    differing = [k for k, (a, b) in same.items() if a != b] + (["recipe"] if recipe != ref_recipe else [])
    if differing:
        tally.fail("mismatch", case, f"run.json differs from the reference in {', '.join(differing)}")


def _compare(case: str, out: Path, ref: Reference, tally: Tally) -> None:
    """Outputs byte-identical to the reference: one mismatch per differing, missing or extra file."""
    files = _outputs(out)
    for rel in sorted(set(files) | set(ref.files)):
        if rel not in files:
            tally.fail("mismatch", case, f"{rel} missing")
        elif rel not in ref.files:
            tally.fail("mismatch", case, f"{rel} extra")
        elif files[rel].read_bytes() != ref.files[rel]:
            tally.fail("mismatch", case, f"{rel} differs from the reference")
    if sorted(_error_lines(out)) != sorted(ref.errors):
        tally.fail("mismatch", case, "errors.jsonl lines differ from the reference")


def _completed(manifest: dict, n_inputs: int) -> bool:
    """run.json of a run that went through every input."""
    counts = manifest.get("counts", {})
    return manifest.get("interrupted") is False and sum(counts.get(k, 0) for k in ("done", "skipped", "failed")) == n_inputs


def _manifest(out: Path) -> dict:
    try:
        return json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def _error_lines(out: Path) -> list[str]:
    return [json.dumps(e, sort_keys=True) for e in errors_lines(out)]


def _stem_of(rel: str) -> str:
    """`heatmaps/saliency/d01.png` -> `d01`."""
    return rel.split("/", 2)[2].rsplit(".", 1)[0]


def _stems(files: dict[str, bytes]) -> list[str]:
    return sorted({_stem_of(rel) for rel in files})


def _finished(out: Path, stems: list[str]) -> set[str]:
    """Inputs whose every output file exists (what a rerun must skip)."""
    return {s for s in stems if all((out / d / m / f"{s}.{ext}").is_file() for d, ext in WRITERS for m in METHODS)}


def _outputs(out: Path) -> dict[str, Path]:
    """Files under heatmaps/ and arrays/, temporary ones aside."""
    return {rel: p for rel, p in tree(out).items() if rel.startswith(("heatmaps/", "arrays/")) and not rel.endswith(".tmp")}


def _temporary(out: Path) -> list[str]:
    return sorted(rel for rel in tree(out) if rel.endswith(".tmp"))


def _stat(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns
