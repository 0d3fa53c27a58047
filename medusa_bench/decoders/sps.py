"""Speculative sampling with a draft model (`sps`, Spec-Bench's "SpS" row).

Leviathan et al. 2023 / Chen et al. 2023 draft with a smaller model of the same tokenizer. This
project ships one base model, so by default the draft is the base model itself with some decoder
layers skipped: self-speculative decoding, training-free (Draft & Verify, Zhang et al. 2023,
arXiv 2309.08168; SWIFT, Xia et al. 2024, arXiv 2410.06916). `--draft-model PATH` drafts with a
separate model instead (its vocabulary must be the base model's).

- The skipped set comes from a calibration search, never from benchmark questions: the base
  model greedily answers a few fixed generic instructions (self-distilled, no data files); a
  candidate set's score is the fraction of those answers' tokens that the skipped model, teacher
  forced over the whole text in one forward, predicts as its top-1. Lazy greedy search (as
  SWIFT's layer-set search, without its Bayesian optimisation): every layer alone, then each
  round adds the best of the `SEARCH_WIDTH` layers that scored best so far, until
  `--sps-skip-ratio` of the layers are skipped (default 0.45: SWIFT's default; Draft & Verify
  skips about half). Whole layers, where both papers skip attention and MLP sub-layers apart.
  The set is cached per model fingerprint in the user cache (`<cache>/sps/`), so a run pays it
  once (SmolLM2-135M on the 2-core CPU: 82 sets scored, 294 s on a loaded machine); `--sps-skip
  3,5,7` fixes it by hand.
- The draft keeps its own KV cache (runtime/layer_skip.DraftRunner, only the layers it runs),
  cropped back to the accepted prefix at the next draft call, which feeds the accepted tokens
  and the new root in one forward.
- Chain drafting (default): one token per draft forward until the draft's top-1 probability falls
  below `--sps-threshold` (Draft & Verify's adaptive stop, at SWIFT's 0.8) or `--sps-max-draft`
  tokens (12; SWIFT's 25 is past what one verify forward pays for on a CPU). When
  sampling, drafts are sampled from the draft's warped distribution and `Draft.probs` carries it
  (lossless speculative sampling). `--sps-tree SPEC` (trees/tree.Tree.parse) drafts a static tree
  level by level from the draft's top-k instead (point-mass drafts), stopping at the first depth
  whose parents are all below the threshold.

SmolLM2-135M is a small model with little to spare: skipping any one of its 30 layers keeps at
most 0.78 top-1 agreement on the calibration answers, 2 layers 0.65, 6 layers 0.41, the default
14 (0.45) 0.20, where the draft is seldom sure enough to draft (tau 1.03 on short test prompts;
3,14 skipped: 1.41). A draft token with 14 layers skipped costs 0.62 of a one-token verify
forward at 300 cached tokens (CPU, one thread: 39 vs 64 ms), with 2 skipped 0.95.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from medusa_bench.decoders.acceptance import warp
from medusa_bench.decoders.base import Sampling
from medusa_bench.decoders.options import DecoderOptions, Option, declare, within
from medusa_bench.decoders.registry import register
from medusa_bench.decoders.spec import DecodeState, Draft, Proposer, SpeculativeDecoder
from medusa_bench.errors import UserError
from medusa_bench.inputs.chat import build_prompt
from medusa_bench.models import DTYPES, load_model, text_config
from medusa_bench.paths import cache_dir
from medusa_bench.runtime.engine import engine_of
from medusa_bench.runtime.layer_skip import DraftRunner, check_layers, skipping
from medusa_bench.trees.levels import level_plan
from medusa_bench.trees.tree import Tree, TreeBuffers

log = logging.getLogger(__name__)

# Generic instructions the base model answers for the calibration search (never benchmark questions).
CALIBRATION_INSTRUCTIONS = (
    "Explain how a bicycle stays upright while it is moving.",
    "Write a short note thanking a neighbour for watering the plants.",
    "Give three practical tips for keeping a kitchen tidy.",
    "Describe what happens to water when it freezes.",
)
CALIBRATION_TOKENS = 48  # answer tokens per instruction: 4 x 48 scored positions
SEARCH_BUDGET = 100  # candidate sets scored: SmolLM2's 30 layers alone, then 4 per added layer
SEARCH_WIDTH = 4  # candidates per greedy round after the first (the best-scoring so far)
SEARCH_VERSION = 1  # bump when the search or its texts change: cached sets are then searched again


# ------------------------------------------------------------------------------ the calibration search
@dataclass(frozen=True)
class Calibration:
    """A text the base model wrote: ids [prompt + answer], and where the answer starts."""

    ids: torch.Tensor  # [1, T]
    answer_start: int


def calibration_texts(loaded, instructions=CALIBRATION_INSTRUCTIONS, tokens: int = CALIBRATION_TOKENS) -> list[Calibration]:
    """The base model's own greedy answers to `instructions` (self-distilled: the draft learns nothing else)."""
    writer = SpeculativeDecoder("calibration", loaded, Proposer())  # the baseline's loop
    texts = []
    for instruction in instructions:
        prompt = build_prompt(loaded, [{"role": "user", "content": instruction}])
        answer = writer.generate(prompt, tokens).token_ids
        texts.append(Calibration(torch.tensor([prompt + answer], device=loaded.device), len(prompt)))
    return texts


def match_rate(model, texts: list[Calibration], skip: tuple[int, ...]) -> float:
    """Fraction of answer tokens the model with `skip` skipped predicts as its top-1, teacher forced.

    The answers are the full model's greedy choices, so this is the top-1 agreement with it.
    """
    right = total = 0
    with torch.inference_mode(), skipping(model, skip):
        for text in texts:
            answer = text.ids[0, text.answer_start:]  # [G]
            logits = model(input_ids=text.ids, use_cache=False, logits_to_keep=answer.numel() + 1).logits[0, :-1]  # [G, V]
            right += int((logits.argmax(-1) == answer).sum())
            total += answer.numel()
    return right / max(total, 1)


def search_skip(score: Callable[[tuple[int, ...]], float], num_layers: int, target: int,
                budget: int = SEARCH_BUDGET, width: int = SEARCH_WIDTH) -> tuple[tuple[int, ...], float, int]:
    """Lazy greedy: each round adds the layer whose skipping keeps the best score.

    Round 1 scores every layer alone (as many as the budget allows, spread over the layers);
    later rounds score the `width` layers whose last score was best. Returns (skip set, its
    score, candidates scored).
    """
    skip: tuple[int, ...] = ()
    last = {layer: 1.0 for layer in range(num_layers)}  # each layer's latest score with it added
    rate, scored = 1.0, 0
    while len(skip) < target:
        remaining = [layer for layer in range(num_layers) if layer not in skip]
        if skip:  # unscored layers (a budget too small for round 1) keep the optimistic 1.0: tried first
            allowance = max(1, min(width, (budget - scored) // (target - len(skip))))
            candidates = sorted(remaining, key=lambda layer: -last[layer])[:allowance]
        else:  # every layer, or as many as leave `width` per later round, spread over the depth
            allowance = max(1, min(num_layers, budget - (target - 1) * width))
            step = -(-num_layers // allowance)
            candidates = remaining[::step][:allowance]
        for layer in candidates:
            last[layer] = score(tuple(sorted(skip + (layer,))))
            scored += 1
        chosen = max(candidates, key=lambda layer: last[layer])
        skip, rate = tuple(sorted(skip + (chosen,))), last[chosen]
    return skip, rate, scored


def model_fingerprint(model) -> str:
    """sha256 of the config's shape and a sample of every parameter: what a cached skip set depends on."""
    config = text_config(model.config)
    digest = hashlib.sha256(json.dumps([type(model).__name__, config.num_hidden_layers, config.hidden_size,
                                        str(model.dtype)]).encode())
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def choose_skip(loaded, ratio: float, budget: int = SEARCH_BUDGET, width: int = SEARCH_WIDTH,
                instructions=CALIBRATION_INSTRUCTIONS, tokens: int = CALIBRATION_TOKENS) -> dict:
    """The skipped set for `loaded` at `ratio`: from the user cache, else searched once and cached.

    Returns the cache record: {"skip", "match", "layers", "scored", "seconds", ...}.
    """
    model = loaded.model
    num_layers = text_config(model.config).num_hidden_layers
    target = min(num_layers - 1, round(ratio * num_layers))
    settings = {"fingerprint": model_fingerprint(model), "ratio": ratio, "target": target, "budget": budget,
                "width": width, "instructions": list(instructions), "tokens": tokens, "version": SEARCH_VERSION}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "sps" / f"{loaded.name}-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    log.warning("sps: searching which %d of %s's %d layers to skip (once; cached in %s)", target, loaded.name, num_layers, path)
    began = time.perf_counter()
    texts = calibration_texts(loaded, instructions, tokens)
    skip, match, scored = search_skip(lambda s: match_rate(model, texts, s), num_layers, target, budget, width)
    record = {"model": loaded.spec, "skip": list(skip), "match": round(match, 4), "layers": num_layers, "scored": scored,
              "seconds": round(time.perf_counter() - began, 1), "settings": settings}
    log.warning("sps: skipping layers %s of %d (top-1 match %.3f on the calibration answers; %d sets scored in %.0f s)",
                list(skip), num_layers, match, scored, record["seconds"])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(path)
    return record


# ------------------------------------------------------------------------------ the proposer
class SpsProposer(Proposer):
    """Drafts a chain (adaptive stop) or a static tree (level by level) with a draft model's top tokens."""

    def __init__(self, runner: DraftRunner, vocab_size: int, max_draft: int = 12, threshold: float = 0.8,
                 tree: Optional[Tree] = None, device: torch.device = torch.device("cpu")):
        self.runner, self.vocab_size = runner, vocab_size
        self.max_draft, self.threshold, self.device = max_draft, threshold, device
        self.tree = tree
        if tree is not None:
            self.buffers = tree.buffers(device)
            self.plan = level_plan(self.buffers)
            self.draft_size = tree.num_nodes - 1
        else:
            self.draft_size = max_draft
        self.sampling, self.generator = Sampling(), None
        self.capacity = 512
        self.shapes: dict[int, TreeBuffers] = {}  # chains of k nodes, or a tree cut to its first k nodes

    def begin(self, sampling: Sampling, capacity: int) -> None:
        """Before a generation (SpsDecoder.prefill): how it samples, how long it may get."""
        self.sampling, self.generator, self.capacity = sampling, None, capacity

    def reset(self, prompt_ids: list[int]) -> None:
        self.runner.reset(self.capacity + self.draft_size + 1)

    def rewind(self, length: int) -> None:
        self.runner.rewind(length)

    def propose(self, root: int, hidden: Optional[torch.Tensor], context: list[int]) -> Optional[Draft]:
        logits = self.fit(self.runner.catch_up(context + [root]))  # [V] the draft's guess after the root
        return self.chain(root, logits) if self.tree is None else self.level_by_level(root, logits)

    def fit(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V_draft] -> [..., V]: a separate draft model's rows padded or cut to the base vocabulary."""
        extra = logits.shape[-1] - self.vocab_size
        if extra >= 0:
            return logits[..., : self.vocab_size]
        return torch.nn.functional.pad(logits, (0, -extra), value=float("-inf"))

    def chain(self, root: int, logits: torch.Tensor) -> Optional[Draft]:
        tokens, rows = [root], []
        for depth in range(1, self.max_draft + 1):
            probs = torch.softmax(logits.float(), -1) if self.sampling.greedy else warp(logits, self.sampling)  # [V]
            if float(probs.max()) < self.threshold:  # Draft & Verify: stop before an unsure token
                break
            if self.sampling.greedy:
                token = int(probs.argmax())
            else:
                token = int(torch.multinomial(probs, 1, generator=self.generator))
                rows.append(probs)
            tokens.append(token)
            if depth < self.max_draft:
                logits = self.fit(self.runner.feed([token], last_only=True)[0])
        if len(tokens) == 1:
            return None
        probs = torch.stack([torch.zeros_like(rows[0])] + rows) if rows else None  # [n, V], row 0 unused
        return Draft(torch.tensor(tokens, device=self.device), self.shape(len(tokens)), probs)

    def level_by_level(self, root: int, logits: torch.Tensor) -> Optional[Draft]:
        """Depth d's nodes are top-k tokens of the draft's logits at their parents (depth d - 1's nodes
        with children, fed in one forward under the tree's ancestor mask); stop at a depth whose
        parents' top-1 probabilities are all below the threshold."""
        buffers, runner = self.buffers, self.runner
        tokens = torch.zeros(buffers.num_nodes, dtype=torch.long, device=self.device)  # [n]
        tokens[0] = root
        base = runner.length  # the context and the root are cached; the root stands at base - 1
        fed: list[int] = []  # tree nodes in the draft cache after `base`, in order
        rows = logits[None]  # [m, V] the draft's logits at the expanding parents (the root first)
        count = buffers.num_nodes
        for depth, level in enumerate(self.plan, start=1):
            if depth > 1:
                parents = buffers.levels[depth - 1][level.expand]  # [m]
                rows = self.fit(runner.feed(tokens[parents].tolist(), base - 2 + depth + torch.zeros_like(parents),
                                            self.level_mask(parents, fed, base)))
                fed += parents.tolist()
            if float(torch.softmax(rows.float(), -1).max()) < self.threshold:
                count = int(buffers.levels[depth][0])  # nodes are in depth order: the shallower ones come first
                break
            top = rows.topk(level.top_k, dim=-1).indices  # [m, k]
            tokens[level.nodes] = top[level.parent_row, level.rank]
        runner.crop(base)  # tree nodes leave the draft cache; the accepted ones come back with the next catch-up
        if count == 1:
            return None
        return Draft(tokens[:count], self.shape(count))

    def level_mask(self, parents: torch.Tensor, fed: list[int], base: int) -> torch.Tensor:
        """[1, 1, m, base + len(fed) + m] additive: the whole context, fed ancestors, itself."""
        keys = torch.tensor(fed, dtype=torch.long, device=self.device)
        seen = self.buffers.attn_mask[parents][:, torch.cat([keys, parents])]  # [m, len(fed) + m]
        dtype = self.runner.model.dtype
        mask = torch.zeros((parents.numel(), base + seen.shape[1]), dtype=dtype, device=self.device)
        mask[:, base:].masked_fill_(~seen, torch.finfo(dtype).min)
        return mask[None, None]

    def shape(self, count: int) -> TreeBuffers:
        """Buffers of a chain of `count` nodes, or of the tree's first `count` nodes (cached)."""
        if count not in self.shapes:
            if self.tree is None:
                self.shapes[count] = TreeBuffers.from_parents(list(range(-1, count - 1)), device=self.device)
            elif count == self.buffers.num_nodes:
                self.shapes[count] = self.buffers
            else:
                parents, ranks = self.buffers.parents[:count].tolist(), self.buffers.ranks[:count].tolist()
                self.shapes[count] = TreeBuffers.from_parents(parents, ranks, device=self.device)
        return self.shapes[count]


class SpsDecoder(SpeculativeDecoder):
    """The shared loop; its prefill tells the proposer how this generation samples and how long it may get."""

    def prefill(self, prompt_ids: list[int], sampling: Sampling = Sampling(), max_new_tokens: Optional[int] = None) -> DecodeState:
        self.proposer.begin(sampling, len(prompt_ids) + (max_new_tokens or 512))
        state = super().prefill(prompt_ids, sampling, max_new_tokens)
        self.proposer.generator = state.generator  # draws for drafts share the run's seeded generator
        return state


# ------------------------------------------------------------------------------ the decoder
def parse_skip(value: str, model) -> tuple[int, ...]:
    """'3,5,7' -> (3, 5, 7), checked against the model ('' or 'none': no layer)."""
    text = value.strip().lower()
    if text in ("", "none"):
        return ()
    try:
        layers = [int(part) for part in text.replace(" ", "").split(",")]
    except ValueError:
        raise UserError(f"--sps-skip must be comma-separated layer numbers like 3,5,7, got {value!r}") from None
    return check_layers(model, layers)


def load_draft(loaded, spec: str):
    """The `--draft-model` model, loaded once beside `loaded` (its companions), on its device and dtype."""
    key = ("sps-draft", spec)
    if key not in loaded.companions:
        dtype = next(name for name, value in DTYPES.items() if value == loaded.dtype)
        draft = load_model(spec, device=str(loaded.device), dtype=dtype)
        ours, theirs = loaded.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
        if ours != theirs:
            differ = len(set(ours.items()) ^ set(theirs.items()))
            raise UserError(f"--draft-model {spec} has another vocabulary than {loaded.name} ({len(theirs)} vs {len(ours)} "
                            f"tokens, {differ} entries differ): a draft model must share the base model's tokenizer")
        loaded.companions[key] = draft
    return loaded.companions[key]


def _skip_option(value) -> Optional[str]:
    text = str(value).strip().lower()
    if value is None or text in ("", "none") or all(part.strip().isdigit() for part in text.split(",")):
        return None
    return f"must be comma-separated layer numbers like 3,5,7, got {value!r}"


declare(
    Option("draft_model", None, "sps: draft with this model (hub id, folder, .gguf or alias; same tokenizer as the "
           "base model) instead of the base model with layers skipped.", kind=str),
    Option("sps_skip", None, "sps: decoder layers the draft skips, e.g. 3,5,7 (default: found by a calibration search "
           "on the base model's own answers to built-in instructions, cached per model).", kind=str, check=_skip_option),
    Option("sps_skip_ratio", 0.45, "sps: share of the layers the calibration search skips (SWIFT's default 0.45).",
           check=within(0.0, 0.9)),
    Option("sps_threshold", 0.8, "sps: stop drafting when the draft's top-1 probability falls below this "
           "(Draft & Verify's adaptive stop; SWIFT's 0.8).", check=within(0.0, 1.0)),
    Option("sps_max_draft", 12, "sps: most tokens drafted per step (chain drafting).", check=within(1, 64, integer=True)),
    Option("sps_tree", None, "sps: draft this static tree level by level from the draft's top-k (a preset, JSON file "
           "or inline list) instead of a chain.", kind=str),
)


@register("sps")
def build_sps(loaded, options: DecoderOptions):
    """SpS: the base model with layers skipped drafts (or `--draft-model`); chain or `--sps-tree` drafts."""
    tree = Tree.parse(options.sps_tree) if options.sps_tree else None
    if tree is not None and tree.num_nodes < 2:
        raise UserError("--sps-tree must draft at least one node, e.g. chain-4 or [[0],[1],[0,0]]")
    captured = engine_of(loaded).compile == "cuda-graphs"
    if options.draft_model:
        drafter = load_draft(loaded, options.draft_model).model
        skip = parse_skip(options.sps_skip, drafter) if options.sps_skip is not None else ()
        described = f"draft model {options.draft_model}" + (f", layers {list(skip)} skipped" if skip else "")
    elif options.sps_skip is not None:
        drafter, skip = loaded.model, parse_skip(options.sps_skip, loaded.model)
        described = f"{loaded.name} with layers {list(skip)} skipped (by hand)"
    else:
        found = choose_skip(loaded, options.sps_skip_ratio)
        drafter, skip = loaded.model, tuple(found["skip"])
        described = (f"{loaded.name} with {len(skip)} of {found['layers']} layers skipped {list(skip)} "
                     f"(calibration top-1 match {found['match']:.3f})")
    runner = DraftRunner(drafter, skip, loaded.device, captured=captured)
    proposer = SpsProposer(runner, loaded.vocab_size, options.sps_max_draft, options.sps_threshold, tree, loaded.device)
    decoder = SpsDecoder("sps", loaded, proposer)
    decoder.draft = described  # what drafts: the skipped set or the draft model
    decoder.skip = skip
    return decoder
