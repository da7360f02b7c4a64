"""The `npz` writer: one array file per input and method output, `arrays/<output>/<stem>.npz`.

Keys: relevance (float32 CxHxW), target (int64), logit and prob (float32), predicted (int64, the
model's top class), method, output and
params (JSON) as unicode strings, the method's extras (this input's row), and with `inputs: true`
the preprocessed model input `input` (float32 CxHxW). Everything loads with allow_pickle=False.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xaicli import Param, Writer, hookimpl
from xaicli.descriptors import BatchOutput, InputItem, WriterContext
from xaicli.io import atomic_write

PARAMS = (
    Param("inputs", bool, False, "also store the preprocessed model input under `input`"),
    Param("compress", bool, False, "zip-deflate the arrays: float relevance shrinks ~10 % for ~15 ms of CPU per "
          "224×224×3 array, so it is off by default"),
)
KEYS = ("relevance", "target", "logit", "prob", "method", "output", "params", "input", "predicted")
RESERVED = KEYS + ("file", "allow_pickle")  # np.savez's own argument names cannot be extras either


@dataclass(frozen=True)
class NpzSink:
    """Writes each input's arrays atomically; holds no mutable state (thread-safe)."""

    out_dir: Path
    inputs: bool
    compress: bool

    def expected(self, item: InputItem, output: str) -> list[Path]:
        return [self.out_dir / "arrays" / output / f"{item.stem}.npz"]

    def write(self, batch: BatchOutput) -> None:
        clash = sorted(set(batch.extras) & set(RESERVED))
        if clash:
            raise ValueError(f"method {batch.method!r} returns extras named like npz keys: {', '.join(clash)}")
        params = json.dumps(batch.params, sort_keys=True, default=str)
        save = np.savez_compressed if self.compress else np.savez
        for i, item in enumerate(batch.items):
            arrays = self._arrays(batch, i, params)
            atomic_write(self.expected(item, batch.output)[0], lambda fh: save(fh, **arrays), root=self.out_dir)

    def _arrays(self, batch: BatchOutput, i: int, params: str) -> dict[str, np.ndarray]:
        arrays = {
            "relevance": np.asarray(batch.relevance[i], dtype=np.float32),
            "target": np.asarray(batch.target[i], dtype=np.int64),
            "logit": np.asarray(batch.logit[i], dtype=np.float32),
            "prob": np.asarray(batch.prob[i], dtype=np.float32),
            "method": np.asarray(batch.method, dtype=np.str_),
            "output": np.asarray(batch.output, dtype=np.str_),
            "params": np.asarray(params, dtype=np.str_),
        }
        if batch.predicted is not None:
            arrays["predicted"] = np.asarray(batch.predicted[i], dtype=np.int64)
        if self.inputs:
            arrays["input"] = np.asarray(batch.inputs[i], dtype=np.float32)
        for key, values in batch.extras.items():
            row = np.asarray(values[i])
            if row.dtype == object:
                raise ValueError(f"extra {key!r} of method {batch.method!r} holds Python objects; npz stores arrays only")
            arrays[key] = row
        return arrays

    def close(self, run: dict[str, Any]) -> None:
        """Nothing to finish: every file is written with its batch."""


def open_npz(ctx: WriterContext, inputs: bool = False, compress: bool = False) -> NpzSink:
    return NpzSink(ctx.out_dir, inputs, compress)


@hookimpl
def xai_writers() -> list[Writer]:
    return [Writer("npz", "relevance and predictions as arrays, arrays/<output>/<input>.npz", open_npz, PARAMS,
                   per_input=True)]
