"""PBConv candidate generation (paper §4.3, Fig. 5).

A candidate is a list of ``(top, left, height, width)`` rectangles (0-based) inside a ``(kh, kw)``
kernel. The legal branch sizes are the ``kh * kw - 1`` sizes ``(h, w)``, ``1 <= h <= kh``,
``1 <= w <= kw``, other than the whole kernel, listed row-major (``1x1, 1x2, ..., 2x1, ...``).

Placement of each new kernel, by rules of decreasing priority (each breaks the ties of the one before):

1. coverage rule: cover as many still-uncovered taps as possible;
2. center rule: cross the kernel's central tap. For an even size there are two central rows (or
   columns); the rule then prefers covering more of the (up to 4) central taps, which for odd sizes
   is the same as "covers the centre or not";
3. alternative rule: "from left to right, from top to bottom", i.e. the first position in reading
   order (smallest top, then smallest left).

Kernels are added until every tap is covered. Each new kernel covers at least one new tap (any
legal size fits over any tap), so a candidate has at most ``kh * kw`` branches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..reparam.geometry import Rect, as_pair

OP_PLACE = "place_kernels"
OP_RANDOM = "random_candidate"


def legal_sizes(kernel_size: int | Sequence[int]) -> list[tuple[int, int]]:
    """The ``kh * kw - 1`` branch sizes smaller than the kernel, row-major."""
    kh, kw = as_pair(kernel_size, "kernel_size", "legal_sizes", 1)
    return [(h, w) for h in range(1, kh + 1) for w in range(1, kw + 1) if (h, w) != (kh, kw)]


def _central(n: int) -> set[int]:
    return {n // 2} if n % 2 else {n // 2 - 1, n // 2}


class _Placer:
    """Incremental placement by the three rules on a ``(kh, kw)`` grid."""

    def __init__(self, kernel_size: tuple[int, int]) -> None:
        self.kh, self.kw = kernel_size
        self.covered = [[False] * self.kw for _ in range(self.kh)]
        self.rows, self.cols = _central(self.kh), _central(self.kw)

    @property
    def full(self) -> bool:
        return all(all(row) for row in self.covered)

    def place(self, size: tuple[int, int]) -> Rect:
        h, w = size
        best, best_key = None, None
        for top in range(self.kh - h + 1):          # reading order: the first maximum wins ties
            for left in range(self.kw - w + 1):
                uncovered = sum(not self.covered[i][j] for i in range(top, top + h) for j in range(left, left + w))
                centre = (sum(top <= i < top + h for i in self.rows) * sum(left <= j < left + w for j in self.cols))
                key = (uncovered, centre)
                if best_key is None or key > best_key:
                    best, best_key = Rect(top, left, h, w), key
        for i, j in best.cells():
            self.covered[i][j] = True
        return best


def place_kernels(kernel_size: int | Sequence[int], sizes: Sequence[Sequence[int]], *,
                  require_full_coverage: bool = True) -> list[Rect]:
    """Place a sequence of ``(height, width)`` kernel sizes on a ``kernel_size`` kernel by the §4.3 rules.

    Placement stops as soon as every tap is covered (later sizes are ignored). Raises ``ValueError``
    if the sequence ends before full coverage (unless ``require_full_coverage=False``) or a size is
    not one of :func:`legal_sizes`.

    Example (paper Fig. 5): ``place_kernels(3, [(3, 1), (1, 3), (3, 1), (3, 1)])`` gives the middle
    column, the middle row, the left column and the right column.
    """
    ks = as_pair(kernel_size, "kernel_size", OP_PLACE, 1)
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TypeError(f"{OP_PLACE}: `sizes` must be a sequence of (height, width) pairs, got {sizes!r}")
    legal = set(legal_sizes(ks))
    checked = []
    for i, s in enumerate(sizes):
        pair = as_pair(s, f"sizes[{i}]", OP_PLACE, 1)
        if pair not in legal:
            raise ValueError(f"{OP_PLACE}: `sizes[{i}]` = {pair} is not a legal branch size for a {ks[0]}x{ks[1]} "
                             "kernel (it must fit and be smaller than the kernel)")
        checked.append(pair)
    placer = _Placer(ks)
    rects = []
    for size in checked:
        if placer.full:
            break
        rects.append(placer.place(size))
    if require_full_coverage and not placer.full:
        raise ValueError(f"{OP_PLACE}: the {len(checked)} `sizes` do not cover the {ks[0]}x{ks[1]} kernel "
                         "(pass require_full_coverage=False to get the partial placement)")
    return rects


def _generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(f"{OP_RANDOM}: `generator` must be a torch.Generator, an int seed or None, got {generator!r}")


def random_candidate(kernel_size: int | Sequence[int], generator: torch.Generator | int | None = None, *,
                     return_sizes: bool = False):
    """Draw one PBConv candidate for a ``kernel_size`` kernel (paper §4.3).

    ``t`` is drawn uniformly from {1, 2, 3} (capped at the number of legal sizes), then ``t``
    distinct kernel types uniformly among :func:`legal_sizes`; kernels of a type drawn uniformly
    among the ``t`` are added and placed by the rules until the kernel is covered.

    Args:
        kernel_size: int or ``(kh, kw)``, larger than 1x1.
        generator: a ``torch.Generator``, an int seed, or None (the global RNG). Same seed, same candidate.
        return_sizes: also return the drawn sequence of sizes (``place_kernels(kernel_size, sizes)``
            reproduces the rectangles).
    Returns:
        The rectangles ``[(top, left, height, width), ...]`` (and the sizes if asked).
    """
    ks = as_pair(kernel_size, "kernel_size", OP_RANDOM, 1)
    sizes = legal_sizes(ks)
    if not sizes:
        raise ValueError(f"{OP_RANDOM}: a {ks[0]}x{ks[1]} `kernel_size` has no smaller kernel to place")
    g = _generator(generator)
    t = min(int(torch.randint(1, 4, (1,), generator=g)), len(sizes))
    types = [sizes[int(i)] for i in torch.randperm(len(sizes), generator=g)[:t]]
    placer = _Placer(ks)
    rects, drawn = [], []
    while not placer.full:
        size = types[int(torch.randint(0, t, (1,), generator=g))]
        drawn.append(size)
        rects.append(placer.place(size))
    return (rects, drawn) if return_sizes else rects
