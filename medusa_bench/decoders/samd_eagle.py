"""SAM decoding with EAGLE-2 as its auxiliary drafter (`samd-eagle2`): Spec-Bench's "SAM-decoding (with EAGLE-2)".

Hu et al., 2024, "SAM Decoding: Speculative Decoding via Suffix Automaton" (arXiv 2411.10666), its
combination with an auxiliary method: retrieval drafts well where the text repeats, a draft
model everywhere else, and the suffix automaton's match length says which case a step is in.
Each step the match length l (the context's automaton, root included; with `--samd-corpus`
the corpus match less `len_bias` when longer, as `samd` chooses) decides:

- l >= `samd_len_threshold` (5): SAM's draft, the continuation of the match (`samd`'s proposer,
  decoders/samd.py, its step-time policy included unless `extra={"samd_adaptive": False}`);
- otherwise, or when SAM's policy drafts nothing: EAGLE-2's dynamic tree (decoders/eagle.py,
  the `eagle2` heads, `--eagle-top-k`, n and depth from `--tree`, which `--tree auto` sizes for
  the EAGLE part with eagle2's tables).

The rule and its 5 are the reference code's (hyx1999/SAM-Decoding: `DraftModel.lookup` drafts
SAM's sequence when max(l_dynamic, l_static - len_bias) >= len_threshold, `SamdConfig` and
scripts/inference_samd.sh `--samd_len_threshold 5 --samd_len_bias 5` for the EAGLE-2 runs).

Both drafters see every step: the automaton is brought up to the context before each decision
(every emitted token, whoever drafted it), and EAGLE gets every `observe` and `rewind`; its
draft layer takes in the rows of SAM-drafted steps at its next draft, all in one forward (the
reference too keeps the accepted hidden states until the next EAGLE draft), so its cache holds
the context's rows or queues them, never another text's. Verification is the one shared loop
(spec.py): lossless under greedy whichever drafter drafted.

Measured (SmolLM2-135M fp32, the shipped EAGLE heads, tree-16, conftest's two short prompts, 24
tokens): τ 1.25 / 1.44, eagle2's exactly, while samd copies the repeated sentence at τ 2.00 (3.33
drafting whole): that answer is a 10-token copy, and a match reaches 5 only near its end.
`--samd-len-threshold 2` gives 2.50 / 1.44; 1 with `samd_adaptive` off 3.33 / 1.44.
"""

from __future__ import annotations

from typing import Optional

import torch

from medusa_bench.decoders.drafting import find_heads
from medusa_bench.decoders.eagle import EagleProposer, eagle_decoder
from medusa_bench.decoders.options import DecoderOptions, Option, declare, within
from medusa_bench.decoders.registry import register
from medusa_bench.decoders.samd import SamProposer, sam_proposer, uses_step_profile
from medusa_bench.decoders.spec import Draft, Proposer, SpeculativeDecoder


class SamEagleProposer(Proposer):
    """SAM's draft when the automaton's match is at least `threshold` long, else EAGLE-2's tree."""

    def __init__(self, sam: SamProposer, eagle: EagleProposer, threshold: int):
        self.sam, self.threshold = sam, threshold
        self.eagle = eagle if eagle.draft_size > 0 else None  # an empty tree (`--tree auto` found none pays): SAM only
        self.needs_hidden = self.eagle is not None
        self.feature_layers = eagle.feature_layers if self.eagle is not None else ()
        self.draft_size = max(sam.draft_size, eagle.draft_size)
        self.tree, self.heads = eagle.tree, eagle.heads  # run.json's tree and heads, the optimiser's fingerprint
        self.drafter: Optional[str] = None  # who drafted the last step: "sam", "eagle" or None (a plain step)
        self.reset([])

    def reset(self, prompt_ids: list[int]) -> None:
        self.sam.reset(prompt_ids)
        if self.eagle is not None:
            self.eagle.reset(prompt_ids)
        self.steps = {"sam": 0, "eagle": 0, None: 0}  # steps per drafter in this generation

    @torch.no_grad()
    def propose(self, root: int, hidden: Optional[torch.Tensor], context: list[int]) -> Optional[Draft]:
        draft, self.drafter = None, None
        if self.sam.match_length(root, context) >= self.threshold:
            draft = self.sam.propose(root, hidden, context)  # None: its policy finds no prefix worth verifying
            self.drafter = "sam" if draft is not None else None
        if draft is None and self.eagle is not None:
            draft, self.drafter = self.eagle.propose(root, hidden, context), "eagle"
        self.steps[self.drafter] += 1
        return draft

    def update(self, accepted: int) -> None:
        if self.drafter == "sam":  # SAM scores its own drafts only (its acceptance statistics)
            self.sam.update(accepted)
        elif self.eagle is not None:
            self.eagle.update(accepted)
        self.drafter = None

    def observe(self, rows: torch.Tensor) -> None:
        if self.eagle is not None:
            self.eagle.observe(rows)

    def rewind(self, length: int) -> None:
        self.sam.rewind(length)
        if self.eagle is not None:
            self.eagle.rewind(length)
        self.drafter = None

    def true_ranks(self, hidden: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, depth: int,
                   top_k: int = 10) -> torch.Tensor:
        return self.eagle.true_ranks(hidden, tokens, positions, depth, top_k)


declare(Option("samd_len_threshold", 5, "samd-eagle2: SAM's draft when its match (root included) is at least this "
               "long, else EAGLE-2's tree (the reference code's len_threshold 5).", check=within(0, 1024, integer=True)))


@register("samd-eagle2", heads=("eagle_heads", "eagle"), tree=True, step_profile=uses_step_profile)
def build_samd_eagle2(loaded, options: DecoderOptions):
    """SAM decoding with EAGLE-2 heads drafting where the automaton's match is short; eagle2's heads and sizing."""
    path = find_heads(options.eagle_heads, loaded, "eagle", "--eagle-heads")
    eagle2 = eagle_decoder("eagle2", loaded, options, path, dynamic=True)  # its heads, tree and sizing
    sam = sam_proposer(loaded, options)
    decoder = SpeculativeDecoder("samd-eagle2", loaded, SamEagleProposer(sam, eagle2.proposer, options.samd_len_threshold))
    decoder.sizing = eagle2.sizing  # `--tree auto` sizes the EAGLE part with eagle2's tables
    decoder.step_profile = sam.costs.profile
    return decoder
