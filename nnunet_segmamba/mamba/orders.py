"""Scan orders of the tokens of a 2D or 3D grid, as permutations (no learned parameters).

Tokens are stored row-major over the grid (B, *grid, C). A `TokenOrder` lists the grid axes from
outermost to innermost and may reverse the sequence; `gather` lays the tokens out in that order,
channels first, for the scan kernels; `scatter` puts scanned tokens back on the grid. `walk` gives the same
permutation as index arithmetic (`Walk`), for kernels that read and write the tokens where they lie.

Order sets used by the networks (3D grid axes 0, 1, 2 = D, H, W):
- `tom_orders`, SegMamba's tri-orientated Mamba: forward raster (D, H, W), its reverse, and the
  inter-slice order (H, W, D) that walks through every slice at one in-plane position before moving on.
  In 2D: forward (H, W), reverse, and column-major (W, H).
- `plane_orders`, SegMamba-V2's tri-orientated spatial Mamba: each axis in turn outermost, the others in
  grid order: (D, H, W), (H, D, W), (W, D, H). In 2D: (H, W) and (W, H).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Walk:
    """A permutation of L indices as arithmetic: index s maps to

        offset + sum_j digit_j(s) * strides[j],

    digit_j(s) the digits of s in the mixed radix `sizes` (outermost first, prod(sizes) = L). Three axes:
    shorter grids have leading axes of size 1."""

    offset: int
    sizes: tuple[int, int, int]
    strides: tuple[int, int, int]

    def __call__(self, s: Tensor) -> Tensor:
        _, n1, n2 = self.sizes
        st0, st1, st2 = self.strides
        return self.offset + s // (n1 * n2) * st0 + s // n2 % n1 * st1 + s % n2 * st2


@dataclass(frozen=True)
class TokenOrder:
    """Grid axes from outermost to innermost, and whether the resulting sequence runs backwards."""

    axes: tuple[int, ...]
    reverse: bool = False

    def gather(self, tokens: Tensor) -> Tensor:
        """(B, *grid, C) -> (B, C, L), the L tokens in this order."""
        ndim = len(self.axes)
        permuted = tokens.permute(0, ndim + 1, *(a + 1 for a in self.axes))
        sequence = permuted.reshape(tokens.shape[0], tokens.shape[-1], -1)
        return sequence.flip(-1) if self.reverse else sequence

    def scatter(self, sequence: Tensor, grid: tuple[int, ...]) -> Tensor:
        """(B, C, L) in this order -> (B, *grid, C), a view where possible."""
        if self.reverse:
            sequence = sequence.flip(-1)
        permuted = sequence.unflatten(-1, [grid[a] for a in self.axes])
        inverse = sorted(range(len(self.axes)), key=self.axes.__getitem__)
        return permuted.permute(0, *(i + 2 for i in inverse), 1)

    def walk(self, grid: tuple[int, ...]) -> Walk:
        """Step of the scan -> row-major grid index of its token (what `gather` reads). Reversed, every digit i
        of the step becomes size - 1 - i."""
        if len(self.axes) > 3:
            raise ValueError(f"A walk covers grids of 1 to 3 axes; this order has {len(self.axes)}: {self.axes}.")
        pad = 3 - len(self.axes)
        sizes = (1,) * pad + tuple(grid[a] for a in self.axes)
        strides = (0,) * pad + tuple(math.prod(grid[a + 1:]) for a in self.axes)
        if not self.reverse:
            return Walk(0, sizes, strides)
        return Walk(sum((n - 1) * st for n, st in zip(sizes, strides)), sizes, tuple(-st for st in strides))

    def positions(self, grid: tuple[int, ...]) -> list[int]:
        """Row-major grid index of the token at each step of the scan (for tests and docs)."""
        index = torch.arange(math.prod(grid)).reshape(1, *grid, 1)
        return self.gather(index)[0, 0].tolist()


def raster_order(ndim: int) -> TokenOrder:
    return TokenOrder(tuple(range(ndim)))


def tom_orders(ndim: int) -> tuple[TokenOrder, ...]:
    forward = raster_order(ndim)
    return forward, TokenOrder(forward.axes, reverse=True), TokenOrder(forward.axes[1:] + forward.axes[:1])


def plane_orders(ndim: int) -> tuple[TokenOrder, ...]:
    return tuple(TokenOrder((a, *(b for b in range(ndim) if b != a))) for a in range(ndim))
