"""Per-input random streams: results never depend on batch size, order or worker count.

Every input gets a seed derived from the recipe seed and the input's relative path; a method
draws its noise for input i from input i's own generator, never from a shared one.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (recipe seed, input key, stream name).

    Surrogate escapes (file names that are not UTF-8) hash as their original bytes.
    """
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class BatchRNG:
    """The random streams of the inputs of one batch.

    Draws are made on the CPU, per input, then stacked and moved to the device, so the same
    input gets the same numbers on every device and in every batch. `stream` names an
    independent sub-stream (e.g. "noise", "baseline") so nested methods do not share draws.
    """

    def __init__(self, seeds: Sequence[int]):
        self.seeds = [int(s) for s in seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: slice | Sequence[int]) -> "BatchRNG":
        if isinstance(index, slice):
            return BatchRNG(self.seeds[index])
        return BatchRNG([self.seeds[i] for i in index])

    def child(self, stream: str) -> "BatchRNG":
        """Independent streams for a nested use (a wrapped method, a metric's re-explanation)."""
        return BatchRNG([derive_seed(s, stream) for s in self.seeds])

    def generators(self, stream: str = "") -> list[torch.Generator]:
        return [torch.Generator().manual_seed(derive_seed(s, stream)) for s in self.seeds]

    def normal(self, shape: Sequence[int], device: torch.device | str = "cpu", stream: str = "") -> torch.Tensor:
        """Standard normal noise of shape [B, *shape]."""
        draws = [torch.randn(tuple(shape), generator=g) for g in self.generators(stream)]
        return torch.stack(draws).to(device)

    def uniform(self, shape: Sequence[int], device: torch.device | str = "cpu", stream: str = "") -> torch.Tensor:
        """Uniform [0, 1) noise of shape [B, *shape]."""
        draws = [torch.rand(tuple(shape), generator=g) for g in self.generators(stream)]
        return torch.stack(draws).to(device)

    def integers(self, high: int, shape: Sequence[int], device: torch.device | str = "cpu", stream: str = "") -> torch.Tensor:
        """Integers in [0, high) of shape [B, *shape]."""
        draws = [torch.randint(high, tuple(shape), generator=g) for g in self.generators(stream)]
        return torch.stack(draws).to(device)

    def permutations(self, n: int, device: torch.device | str = "cpu", stream: str = "") -> torch.Tensor:
        """One random permutation of range(n) per input: [B, n]."""
        draws = [torch.randperm(n, generator=g) for g in self.generators(stream)]
        return torch.stack(draws).to(device)
