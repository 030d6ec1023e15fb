"""Token shift over packed sequences: selecting each row's previous row (or the carried state).

A step's activations are packed rows of several sequences; for each sequence they hold the
positions [start, T) of its new tokens (all of them in the Finch layers, a shrinking tail in the
GOLD layers). Every token-shift mix needs, for a selection of positions, the row before each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .host_copy import to_device


@dataclass
class Windows:
    """Per sequence, the positions [start, T) of the rows held in a packed tensor."""

    starts: list[int]
    lens: list[int]  # T per sequence


class IndexCache:
    """Index tensors that repeat across the layers of one step, copied to the device once: a copy
    from pageable host memory waits for the GPU to drain, so one per layer would serialise it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._memo: dict = {}

    def get(self, key, build) -> Tensor:
        t = self._memo.get(key)
        if t is None:
            t = self._memo[key] = to_device(build(), torch.long, self.device)
        return t


def select_with_prev(x: Tensor, win: Windows, new_starts: list[int], carried: Tensor,
                      idx: IndexCache) -> tuple[Tensor, Tensor, Tensor]:
    """From rows of positions [win.starts[i], T_i), take positions [new_starts[i], T_i) and the row
    before each (the carried state before position 0). Returns (cur, prev, last row of each seq).

    Index arithmetic is vectorised (prompts of a million tokens pass through here per layer); one
    sequence's rows are plain slices."""
    if len(win.starts) == 1:
        return _select_one(x, win.starts[0], win.lens[0], new_starts[0], carried)
    starts, lens, news = tuple(win.starts), tuple(win.lens), tuple(new_starts)
    key = (starts, lens, news)
    rows = [t - s for s, t in zip(starts, lens)]
    base = [0]
    for r in rows[:-1]:
        base.append(base[-1] + r)
    last = idx.get(("last", starts, lens), lambda: [b + r - 1 for b, r in zip(base, rows)])
    if all(s == 0 and ns == 0 for s, ns in zip(starts, news)):  # every row, previous row or carried
        prev = torch.cat([x[:1], x[:-1]])
        prev[idx.get(("base", lens), lambda: base)] = carried.to(x.dtype)
        return x, prev, x[last]
    for s, t, ns in zip(starts, lens, news):
        _check_window(s, t, ns)

    def build(which: str):
        counts = torch.tensor([t - ns for t, ns in zip(lens, news)])
        seq = torch.repeat_interleave(torch.arange(len(rows)), counts)
        first = torch.cumsum(counts, 0) - counts
        pos = torch.tensor(news)[seq] + torch.arange(int(counts.sum())) - first[seq]
        start = torch.tensor(starts)[seq]
        cur = torch.tensor(base)[seq] + pos - start
        return cur if which == "cur" else torch.where(pos - 1 >= start, cur - 1, x.shape[0] + seq)

    cur = idx.get(("cur",) + key, lambda: build("cur"))
    prev = idx.get(("prev", x.shape[0]) + key, lambda: build("prev"))
    ext = torch.cat([x, carried.to(x.dtype)])
    return ext[cur], ext[prev], x[last]


def _check_window(s: int, t: int, ns: int) -> None:
    if not (s <= ns < t and (ns > s or ns == 0)):
        raise AssertionError(f"window [{s}, {t}) too short to select [{ns}, {t}) with its token shift")


def _select_one(x: Tensor, s: int, t: int, ns: int, carried: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`select_with_prev` of one sequence (x: positions [s, t)) as views of x: no index tensors,
    copies or gathers (the GOLD layers of a prompt's last step call this four times a layer; each
    index tensor was a host-to-device copy and each selection a gather). Only a selection from
    position 0 concatenates the carried row."""
    _check_window(s, t, ns)
    cur = x[ns - s:]
    prev = x[ns - s - 1: t - s - 1] if ns > s else torch.cat([carried.to(x.dtype), x[: t - s - 1]])
    return cur, prev, x[t - s - 1:]
