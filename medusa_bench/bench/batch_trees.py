"""The tree optimiser at batch B: the same acceptance tables, step times measured with B rows.

A tree of n nodes costs t(B, n), one batched verify step of B rows each drafting it (drafting
included: every row's proposer drafts), and the baseline t(B, 1), one token per row. The
speedup the search maximises is then τ(n) × t(B, 1) / t(B, n), as at batch 1 (trees/search.py):
τ does not depend on B, the step cost does. On a CPU a forward's cost grows with its tokens
B × n, so the tree that pays shrinks as B grows; vLLM's dynamic draft length does this for
chains, this does it for trees.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch

from medusa_bench.bench import calibrate as cal
from medusa_bench.bench.autotree import AutoTree, profile_trees, settings_of, size_tree
from medusa_bench.decoders.batched import BatchedDecoder
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.decoders.registry import build_decoder, spec_options
from medusa_bench.decoders.spec import Proposer, SpeculativeDecoder
from medusa_bench.errors import UserError
from medusa_bench.runtime.forward import sync
from medusa_bench.trees.search import SearchResult, best_tree
from medusa_bench.trees.tables import Latency
from medusa_bench.trees.tree import Tree


@dataclass
class BatchTree:
    """The optimiser's answer at one batch size, beside its batch-1 answer."""

    batch_size: int
    result: SearchResult  # the tree at this B and why (its table: τ, t(B, n), predicted speedup per n)
    latency: Latency  # t(B, n) per profiled n
    single: AutoTree  # the batch-1 answer (its calibration is the one the search used)

    @property
    def tree(self) -> Tree:
        return self.result.tree


@torch.inference_mode()
def batch_latency(loaded, make_proposer, trees: dict[int, Tree], context: list[int], batch_size: int,
                  repeats: int = 5, warmup: int = 2) -> Latency:
    """Median seconds of one batched verify step per tree size n, B rows on the same context, rewound after each."""
    times: dict[int, list[float]] = {n: [] for n in trees}
    batches = {}
    for n, tree in sorted(trees.items()):
        decoders = [SpeculativeDecoder(f"n{n}", loaded, Proposer() if tree.num_nodes == 1 else make_proposer(tree))
                    for _ in range(batch_size)]
        batch = BatchedDecoder(decoders)
        state = batch.prefill([context] * batch_size, 64)  # steps are rewound: the cache never holds more than one
        batches[n] = (batch, state, batch.checkpoint(state))
    for round_ in range(warmup + repeats):
        for n, (batch, state, mark) in batches.items():
            roots = [int(row.logits.argmax()) for row in state.active]
            sync(loaded.device)
            start = time.perf_counter()
            batch.verify(state, roots)
            sync(loaded.device)
            elapsed = time.perf_counter() - start
            batch.rewind(state, mark)
            if round_ >= warmup:
                times[n].append(elapsed)
    step_time = {n: statistics.median(ts) for n, ts in times.items()}
    return Latency(step_time, device=cal.device_name(loaded), dtype=str(loaded.dtype).replace("torch.", ""),
                   context_len=len(context), baseline_step_time=step_time.get(1),
                   meta={"batch_size": batch_size, "repeats": repeats, "warmup": warmup, "statistic": "median",
                         "threads": torch.get_num_threads(), "trees": {str(n): t.to_list() for n, t in trees.items()}})


def tree_for_batch(spec: str, loaded, batch_size: int, options: Optional[DecoderOptions] = None,
                   repeats: int = 5, warmup: int = 2) -> BatchTree:
    """`--tree auto` for decoder `spec` at batch `batch_size`: its batch-1 tables (cached), step times at B rows."""
    found, options = spec_options(spec, options)
    if not found.tree:
        raise UserError(f"decoder {spec!r} drafts on no tree: there is no tree to size at batch {batch_size}")
    options = options.replace(tree="auto")
    single = size_tree(found.name, loaded, options)
    sizing = build_decoder(found.name, loaded, options.replace(tree=Tree.empty())).sizing
    settings = settings_of(options)
    depth = min(sizing.depth, settings.max_depth or sizing.depth)
    trees = profile_trees(single.calibration, settings, depth)
    latency = batch_latency(loaded, sizing.make_proposer, trees, cal.profile_context(loaded), batch_size, repeats, warmup)
    result = best_tree(single.calibration, latency, max(latency.step_time), depth, sizing.depth, settings.min_speedup)
    return BatchTree(batch_size, result, latency, single)
