"""The `png` writer: one heatmap picture per input and method output, `heatmaps/<output>/<stem>.png`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xaicli import Param, Writer, hookimpl
from xaicli.descriptors import BatchOutput, InputItem, WriterContext
from xaicli.errors import UsageError
from xaicli.io import atomic_write
from xaicli.concepts.grid import concept_grid
from xaicli.model import InputSpec
from xaicli.render import REDUCTIONS, Colormap, colormap, denormalise, normalise, overlay, to_original

PNG_LEVEL = 3  # zlib level: 3x faster than Pillow's default 6 on 224x224 heatmaps, files 4 % larger
PARAMS = (
    Param("colormap", str, "bwr", "colormap name (bwr, coldnhot, hot, cold, gray, wred, wblue, seismic, france, "
          "cividis, viridis) or a spec such as '00f,80:fff,f00' (hex positions 00..ff and colours)"),
    Param("symmetric", bool, True, "scale [-max|R|, max|R|] to the colormap, zero at its centre; false scales [min, max]"),
    Param("reduce", str, "sum", "how channels become one value per pixel: signed sum, sum of magnitudes, "
          "or largest magnitude", choices=REDUCTIONS),
    Param("level", float, 1.0, "contrast: values move away from the colormap centre by this factor and clip", low=0.0),
    Param("size", str, "input", "picture size: the model input, or the original image (the crop put back in place)",
          choices=("input", "original")),
    Param("overlay", bool, False, "blend the heatmap on the image: the de-normalised model input at size "
          "input, the original image at size original"),
    Param("alpha", float, 0.5, "heatmap weight when overlaying", low=0.0, high=1.0),
)


@dataclass(frozen=True)
class PngSink:
    """Renders each input's relevance and writes it atomically; holds no mutable state (thread-safe)."""

    out_dir: Path
    cmap: Colormap
    symmetric: bool
    reduce: str
    level: float
    size: str
    overlay: bool
    alpha: float
    spec: InputSpec | None

    def expected(self, item: InputItem, output: str) -> list[Path]:
        return [self.out_dir / "heatmaps" / output / f"{item.stem}.png"]

    def write(self, batch: BatchOutput) -> None:
        if batch.relevance.ndim == 5:  # one heatmap per concept (crp): a labelled grid at input size
            self._write_concepts(batch)
            return
        values, zero = normalise(batch.relevance, self.symmetric, self.reduce, self.level)
        if self.size == "input":
            pictures = self.cmap(values)
            if self.overlay:
                assert self.spec is not None  # checked when opened
                pictures = overlay(denormalise(batch.inputs, self.spec.mean, self.spec.std), pictures, self.alpha)
            for item, picture in zip(batch.items, pictures):
                self._save(item, batch.output, picture)
            return
        for i, item in enumerate(batch.items):
            image = batch.images[i]
            picture = self.cmap(to_original(values[i], batch.resized[i], batch.crops[i], image.shape[:2], fill=zero[i]))
            self._save(item, batch.output, overlay(image, picture, self.alpha) if self.overlay else picture)

    def _write_concepts(self, batch: BatchOutput) -> None:
        images = denormalise(batch.inputs, self.spec.mean, self.spec.std) if self.overlay and self.spec else None
        for i, item in enumerate(batch.items):
            k = batch.relevance.shape[1]
            concepts = batch.extras.get("concepts", np.tile(np.arange(k), (len(batch.items), 1)))[i]
            share = batch.extras.get("concept_relevance", np.zeros((len(batch.items), k)))[i]
            grid = concept_grid(batch.relevance[i], concepts, share, self.cmap, self.symmetric, self.reduce,
                                self.level, images[i] if images is not None else None, self.alpha)
            self._save(item, batch.output, grid)

    def _save(self, item: InputItem, output: str, picture: np.ndarray) -> None:
        save = lambda fh: Image.fromarray(picture).save(fh, format="PNG", compress_level=PNG_LEVEL)  # noqa: E731
        atomic_write(self.expected(item, output)[0], save, root=self.out_dir)

    def close(self, run: dict[str, Any]) -> None:
        """Nothing to finish: every picture is written with its batch."""


def open_png(ctx: WriterContext, **params: Any) -> PngSink:
    """Check the colormap (and that overlays at input size can be de-normalised) before the run starts."""
    try:
        cmap = colormap(params.get("colormap", "bwr"))
    except ValueError as exc:
        raise UsageError(f"png writer: {exc}") from None
    values = {p.name: params.get(p.name, p.default) for p in PARAMS if p.name != "colormap"}
    if values["overlay"] and values["size"] == "input" and ctx.spec is None:
        raise UsageError("png writer: overlay at size 'input' needs the model's input spec (mean, std) in the writer context")
    return PngSink(ctx.out_dir, cmap, spec=ctx.spec, **values)


@hookimpl
def xai_writers() -> list[Writer]:
    return [Writer("png", "heatmap pictures, heatmaps/<output>/<input>.png", open_png, PARAMS, per_input=True)]
