"""B sequences in one forward: which cache columns each row sees, its masks and positions.

Rows share one `SlotCache` whose columns are common to all rows (the vLLM-v1 idea of batch-first
preallocated buffers, with a column map instead of a block table). A column is valid for a row
when it holds one of that row's context tokens; the rest are holes the row's mask hides:

- prompts are left-padded to the longest, so a short prompt's first columns are holes;
- a verify step writes every row's tree at the same columns W … W+n-1, and then each row keeps
  its own accepted path at W … W+m-1 (m: the longest path kept this step, `SlotCache.keep_rows`);
  a row that kept fewer has holes at the end of those m columns.

So no row is ever shifted against another; a row's positions count its valid columns, not the
columns, and it sees exactly the keys it would see decoded alone (holes cost masked attention
work: at most m - 1 columns a step and a row).
"""

from __future__ import annotations


import torch

from medusa_bench.runtime.forward import forward_rows  # noqa: F401 (B rows in one forward: callers import it from here)


class Columns:
    """valid [B, capacity] bool: which cache columns hold each row's context; `width` columns are in use."""

    def __init__(self, prompt_lengths: list[int], capacity: int, device: torch.device):
        width = max(prompt_lengths)
        self.valid = torch.zeros(len(prompt_lengths), capacity, dtype=torch.bool, device=device)  # [B, C]
        for row, length in enumerate(prompt_lengths):
            self.valid[row, width - length:width] = True
        self.width = width
        self.lengths = torch.tensor(prompt_lengths, device=device)  # [B] context tokens per row

    def reserve(self, need: int) -> None:
        if need > self.valid.shape[1]:
            grown = self.valid.new_zeros(self.valid.shape[0], max(need, 2 * self.valid.shape[1]))
            grown[:, : self.valid.shape[1]] = self.valid
            self.valid = grown

    def prefill_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[B, 1, P, P] additive: causal over each row's valid columns; a pad column sees itself (no empty row)."""
        width = self.width
        valid = self.valid[:, :width]  # [B, P]
        causal = torch.ones(width, width, dtype=torch.bool, device=valid.device).tril()  # [P, P]
        allowed = causal[None] & valid[:, None, :]  # [B, P, P]
        allowed |= torch.eye(width, dtype=torch.bool, device=valid.device)[None]
        return additive(allowed, dtype)

    def prefill_positions(self) -> torch.Tensor:
        """[B, P]: a left-padded row's tokens stand at 0 … P_r - 1 (its pad columns at 0)."""
        return (self.valid[:, : self.width].long().cumsum(-1) - 1).clamp(min=0)

    def step_mask(self, tree: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """tree [B, n, n] bool (ancestor-or-self) -> [B, 1, n, width + n] additive over each row's context and tree."""
        rows, n, _ = tree.shape
        context = self.valid[:, None, : self.width].expand(rows, n, self.width)  # [B, n, W]
        return additive(torch.cat([context, tree], dim=-1), dtype)

    def keep(self, kept: list[int]) -> None:
        """After `SlotCache.keep_rows(width, ...)`: row b kept kept[b] of the next max(kept) columns."""
        m = max(kept)
        counts = torch.tensor(kept, device=self.valid.device)  # [B]
        self.reserve(self.width + m)
        self.valid[:, self.width:self.width + m] = torch.arange(m, device=self.valid.device)[None] < counts[:, None]
        self.width += m
        self.lengths = self.lengths + counts

    def first_used(self) -> int:
        """The first column any row still sees (the columns before it can be dropped)."""
        used = self.valid[:, : self.width].any(0)  # [W]
        return int(used.int().argmax()) if bool(used.any()) else self.width

    def join(self, other: "Columns", start: int, width: int, capacity: int) -> None:
        """`SlotCache.join`'s column map: this batch's columns start … width-1 and `other`'s, both
        right-aligned to end at `width`; `other`'s rows after this batch's."""
        mine, theirs = self.width - start, other.width
        valid = self.valid.new_zeros(len(self.lengths) + len(other.lengths), capacity)  # [B + B', C]
        valid[: len(self.lengths), width - mine:width] = self.valid[:, start:self.width]
        valid[len(self.lengths):, width - theirs:width] = other.valid[:, :theirs]
        self.valid, self.width = valid, width
        self.lengths = torch.cat([self.lengths, other.lengths])

    def select(self, rows: torch.Tensor) -> None:
        """Keep only these rows (finished ones left the batch)."""
        self.valid, self.lengths = self.valid[rows], self.lengths[rows]


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [B, q, k] -> [B, 1, q, k]: 0 where allowed, dtype's min elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
