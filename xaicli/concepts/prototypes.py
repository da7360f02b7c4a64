"""Prototypes (PCX, Dreyer et al. 2024): per class, a Gaussian mixture over the inputs' concept-relevance
vectors (channel shares at a layer); its components are the class's prototypical ways of deciding,
and inputs with a low likelihood under their class's mixture reason unusually for it.

scikit-learn's GaussianMixture (seeded, diagonal covariances: classes often have fewer inputs than
channels, where full covariances are singular). A class with fewer inputs than 2·K gets
max(1, inputs // 2) components.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import escaped
from ..io import atomic_write_bytes, atomic_write_json

NEAREST = 5  # inputs listed per prototype


@dataclass
class Outlier:
    name: str
    relpath: str
    label: int
    log_likelihood: float


def fit(kept: list[tuple[str, int, np.ndarray]], k: int, seed: int) -> tuple[dict[str, Any], list[Outlier]]:
    """Per class mixtures over (name, class, share vector) rows: the prototypes.json content and every
    input's log-likelihood under its class's mixture (lowest first)."""
    from sklearn.mixture import GaussianMixture

    classes: dict[int, list[tuple[str, np.ndarray]]] = {}
    for name, label, vector in kept:
        classes.setdefault(label, []).append((name, vector))
    prototypes: dict[str, Any] = {}
    scored: list[Outlier] = []
    for label in sorted(classes):
        members = sorted(classes[label], key=lambda pair: pair[0])
        names = [m for m, _ in members]
        x = np.stack([v for _, v in members])
        components = k if len(x) >= 2 * k else max(1, len(x) // 2)
        mixture = GaussianMixture(components, covariance_type="diag", random_state=seed, reg_covar=1e-6, n_init=1)
        mixture.fit(x)
        likelihood = mixture.score_samples(x)
        scored.extend(Outlier(n, "", label, float(ll)) for n, ll in zip(names, likelihood))
        entries = []
        for j in np.argsort(-mixture.weights_, kind="stable"):
            distance = np.linalg.norm(x - mixture.means_[j], axis=1)
            nearest = np.argsort(distance, kind="stable")[:NEAREST]
            entries.append({"weight": float(mixture.weights_[j]), "mean": mixture.means_[j].round(6).tolist(),
                            "top_concepts": np.argsort(-mixture.means_[j], kind="stable")[:8].tolist(),
                            "nearest": [{"path": names[i], "distance": float(distance[i])} for i in nearest]})
        prototypes[str(label)] = {"count": len(x), "components": components, "prototypes": entries}
    scored.sort(key=lambda o: (o.log_likelihood, o.name))
    return prototypes, scored


def write(out_dir: Path, layer: str, k: int, seed: int, prototypes: dict[str, Any], outliers: list[Outlier],
          relpaths: dict[str, str]) -> None:
    """prototypes.json and outliers.csv (input, path, class, log_likelihood; lowest first)."""
    atomic_write_json(out_dir / "prototypes.json", {"layer": layer, "components": k, "seed": seed,
                                                    "classes": prototypes}, root=out_dir)
    text = io.StringIO()
    table = csv.writer(text, lineterminator="\n")
    table.writerow(["input", "path", "class", "log_likelihood"])
    for o in outliers:
        table.writerow([escaped(relpaths.get(o.name, "")), escaped(o.name), o.label, f"{o.log_likelihood:.6g}"])
    atomic_write_bytes(out_dir / "outliers.csv", text.getvalue().encode(), root=out_dir)
