"""The analysis folder: analysis.json, clusters.csv, analysis.h5 (ViRelAy's layout) and means/*.png.

Every file is written atomically (a temporary name, then a rename); analysis.json is written last,
so its presence means the folder is complete.

analysis.h5 follows the analysis files ViRelAy's backend reads (virelay/model.py, and its
documented example `meta_analysis.py`): one top-level group per category, holding
- `index`: uint32 [N], the rows of the category in the run (positions in sorted stem order of the
  method's arrays), and `name` (string);
- `embedding/spectral`: float32 [N, n] eigenvectors, attribute `eigenvalue` float32 [n]; as CoRelAy
  returns them (eigenvalues 1 - eig(M) descending, the trivial one last), where analysis.json lists
  them ascending; `embedding/tsne` (and `umap`): float32 [N, 2] with attributes `embedding`
  ("spectral") and `index` ([0, 1]);
- `cluster/<clustering>`: int32 [N] labels (-1 = noise), attributes `embedding`, `index`, and `k`
  for k-means and Ward.
ViRelAy reads datasets with attributes (its spec's `root`/`eigenvalue` sub-keys are not what its
backend opens). A category is named by the class, zero-padded to 8 digits (`00000003`) when the
folder analyses one method output, else `<output>-<class>`; each has attributes `method`, `class`
and `class_source`. Groups from other analyses than spray keep their embeddings' own names.
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..io import atomic_write, atomic_write_bytes, atomic_write_json
from ..render import colormap, normalise

MEAN_SIZE = 64
MEAN_COLORMAP = "coldnhot"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str) -> str:
    """A file-name-safe form of an output or clustering name."""
    return _UNSAFE.sub("_", text).strip("._") or "x"


def mean_png(mean: np.ndarray, shape: tuple[int, int], size: int = MEAN_SIZE) -> bytes:
    """A cluster's mean heatmap as a size x size PNG: symmetric coldnhot (zero at black, the centre)."""
    values, _ = normalise(mean.reshape(shape), symmetric=True)
    rgb = colormap(MEAN_COLORMAP)(values)
    picture = Image.fromarray(rgb).resize((size, size), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def write_mean(out_dir: Path, method: str, cls: int, clustering: str, cluster: int, mean: np.ndarray,
               shape: tuple[int, int]) -> str:
    """Write one mean heatmap; returns its path relative to the analysis folder."""
    rel = f"means/{safe_name(method)}-{cls}-{safe_name(clustering)}-{cluster}.png"
    atomic_write_bytes(out_dir / rel, mean_png(mean, shape), root=out_dir)
    return rel


def write_csv(out_dir: Path, groups: Sequence[dict[str, Any]]) -> None:
    """clusters.csv: input, class, method, clustering, cluster; one row per input and clustering."""
    def write(fh: Any) -> None:
        text = io.TextIOWrapper(fh, encoding="utf-8", newline="")
        rows = csv.writer(text)
        rows.writerow(["input", "class", "method", "clustering", "cluster"])
        for g in groups:
            for name, clustering in g["clusterings"].items():
                rows.writerows((inp, g["class"], g["method"], name, int(label))
                               for inp, label in zip(g["inputs"], clustering["labels"]))
        text.flush()
        text.detach()

    atomic_write(out_dir / "clusters.csv", write, root=out_dir)


def write_h5(out_dir: Path, groups: Sequence[dict[str, Any]], arrays: Sequence[dict[str, Any]]) -> None:
    """analysis.h5 in ViRelAy's layout (module docstring); `arrays` holds per group its index,
    embeddings, eigenvalues, views and labels as numpy arrays."""
    import h5py

    single = len({g["method"] for g in groups}) <= 1
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        for g, a in zip(groups, arrays):
            name = f"{g['class']:08d}" if single else f"{safe_name(g['method'])}-{g['class']:08d}"
            cat = h5.create_group(name)
            cat.attrs.update({"method": g["method"], "class": g["class"], "class_source": g["class_source"]})
            cat["name"] = f"{g['method']}, class {g['class']}"
            cat["index"] = np.asarray(a["index"], dtype=np.uint32)
            embedding = cat.create_group("embedding")
            first = ""
            for key, values in a["embeddings"].items():
                first = first or key
                if a["eigenvalues"] is not None and key == first:
                    # CoRelAy's order: eigenvalues of L descending, columns to match
                    embedding[key] = np.asarray(values[:, ::-1], dtype=np.float32)
                    embedding[key].attrs["eigenvalue"] = np.asarray(a["eigenvalues"][::-1], dtype=np.float32)
                else:
                    embedding[key] = np.asarray(values, dtype=np.float32)
            for key, xy in a["views"].items():
                embedding[key] = np.asarray(xy, dtype=np.float32)
                embedding[key].attrs["embedding"] = first
                embedding[key].attrs["index"] = np.array([0, 1], dtype=np.uint32)
            clusters = cat.create_group("cluster")
            width = a["embeddings"][first].shape[1] if first else 0
            for key, labels in a["labels"].items():
                clusters[key] = np.asarray(labels, dtype=np.int32)
                clusters[key].attrs["embedding"] = first
                clusters[key].attrs["index"] = np.arange(width, dtype=np.uint32)
                k = key.rsplit("-", 1)[-1]
                if k.isdigit():
                    clusters[key].attrs["k"] = int(k)
    atomic_write_bytes(out_dir / "analysis.h5", buffer.getvalue(), root=out_dir)


def write_json(out_dir: Path, document: dict[str, Any]) -> None:
    atomic_write_json(out_dir / "analysis.json", document, root=out_dir)


def remove_stale_means(out_dir: Path, written: set[str]) -> None:
    """Delete means/*.png that this run did not write (left by a run with other settings)."""
    folder = out_dir / "means"
    if folder.is_dir():
        for path in folder.glob("*.png"):
            if f"means/{path.name}" not in written:
                path.unlink(missing_ok=True)
