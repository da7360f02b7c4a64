"""Which class each input is explained for: the predicted one, a fixed one, or one from a CSV file."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from .descriptors import InputItem
from .errors import InputError, UsageError


class Targets:
    """Resolves the target class of every input of a batch.

    `spec` is None (the model's top class), an int (that class for every input) or a CSV file
    with a header `path,target`: `path` is the input's relative path (as in output names),
    `target` a class index or a class name from the labels file.
    """

    def __init__(self, spec: int | str | Path | None, labels: list[str] | None, num_classes: int | None = None):
        self.fixed: int | None = None
        self.table: dict[str, int] | None = None
        self.labels = labels
        if isinstance(spec, int):
            self.fixed = spec
        elif spec is not None:
            self.table = self._read_csv(Path(spec))

    def _class_index(self, value: str, where: str) -> int:
        value = value.strip()
        if value.lstrip("-").isdigit():
            return int(value)
        if self.labels and value in self.labels:
            return self.labels.index(value)
        raise UsageError(f"{where}: target {value!r} is neither a class index nor a class name from the labels file")

    def _read_csv(self, path: Path) -> dict[str, int]:
        if not path.is_file():
            raise UsageError(f"target CSV {path} does not exist")
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"path", "target"} <= set(reader.fieldnames):
                raise UsageError(f"target CSV {path} needs a header with the columns path,target; got {reader.fieldnames}")
            return {
                row["path"].strip().replace("\\", "/"): self._class_index(row["target"], f"{path}:{line}")
                for line, row in enumerate(reader, start=2)
            }

    def resolve(self, items: list[InputItem], logits: torch.Tensor) -> tuple[torch.Tensor, list[InputError | None]]:
        """Target per input and, per input, an error when it has none or it is out of range."""
        num_classes = logits.shape[1]
        if self.fixed is not None and not 0 <= self.fixed < num_classes:
            raise UsageError(f"--target {self.fixed} is out of range: the model has {num_classes} classes")
        predicted = logits.argmax(1).cpu()
        targets, errors = [], []
        for i, item in enumerate(items):
            t = self.fixed if self.fixed is not None else predicted[i].item()
            error = None
            if self.table is not None:
                if item.relpath in self.table:
                    t = self.table[item.relpath]
                else:
                    error = InputError(f"no row for {item.relpath!r} in the target CSV", stage="target")
            if error is None and not 0 <= t < num_classes:
                error = InputError(f"target class {t} is out of range: the model has {num_classes} classes", stage="target")
            targets.append(t if error is None else 0)
            errors.append(error)
        return torch.tensor(targets, dtype=torch.long), errors
