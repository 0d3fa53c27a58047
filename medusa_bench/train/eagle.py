"""EAGLE head training on a frozen base model: the draft unrolled along self-distilled conversations.

The base features of every sequence are computed once and cached on disk (`train/data.py`:
the final normed state for EAGLE-1/2; for EAGLE-3 its three feature layers and the final
state). Each batch unrolls the draft `--ttt-steps` deep along the data (`EagleHeads.unroll`:
depth d reads the draft's own depth d - 1 outputs, with the attention a tree node sees), and
the loss at depth d is weighted 0.8^(d - 1):

- EAGLE-1/2 (`eagle`, Li et al. 2024): feature regression, SmoothL1(g, f_next) × 1.0, plus
  token cross-entropy against the base model's distribution × 0.1; uniform noise U(±noise/2)
  on the input features (the paper's 0.2) for robustness to the draft's own errors; one step
  (the paper's recipe) by default.
- EAGLE-3 (`eagle3`, Li et al. 2025): token cross-entropy only, against the base model's
  distribution over the draft vocabulary (the `--draft-vocab` most frequent answer tokens),
  on positions whose token the draft vocabulary holds; training-time test over 3 steps by
  default (a CPU budget; the paper's 7 with `--ttt-steps 7`, what scripts/train_default_heads.sh
  runs on a GPU).

The softmax of EAGLE-1/2's token loss runs over the active vocabulary (every target token of
the data), as the other trainers' does; held-out accuracy and calibration use the drafting
vocabulary in full. A run writes the heads (`model.safetensors` + `config.json`, the reference
layout), `calibration.json` (held-out path-conditional statistics for `--tree auto`),
`curve.csv`, `training.json` (with held-out top-1/top-5 per depth) and, for EAGLE-1/2,
`draft_vocab.json`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from rich.console import Console

from medusa_bench.errors import UserError
from medusa_bench.heads import io
from medusa_bench.heads.eagle import VARIANTS, EagleHeads, eagle3_layers, new_eagle_heads, save_eagle_heads
from medusa_bench.models import text_config
from medusa_bench.train.data import Sequence
from medusa_bench.train.fit import (FitConfig, FitResult, active_vocab, check_out_folder, epoch_line, on_device, prepare_sequences,
                                    summary, train_loop, write_curve)
from medusa_bench.train.hydra import batches, conditional_ranks
from medusa_bench.train.vocab import ranked_tokens, write_draft_vocab
from medusa_bench.trees.ranks import statistics_of
from medusa_bench.trees.tables import save_calibration

Pair = tuple[Sequence, torch.Tensor]  # a sequence and its cached base rows [T, W]
DEPTH_DECAY = 0.8  # loss weight per depth (EAGLE-3's training-time test)


@dataclass
class EagleFitConfig(FitConfig):
    """The shared trainer's settings plus EAGLE's; `num_heads` is the depth held-out accuracy is reported to."""

    variant: str = "eagle"
    num_heads: int = 5
    ttt_steps: int = 0  # unrolled depths per example; 0: the paper's (EAGLE-1/2: 1, EAGLE-3: 3)
    noise: Optional[float] = None  # uniform noise width on input features; None: 0.2 for EAGLE-1/2, 0 for EAGLE-3
    feature_weight: float = 1.0  # EAGLE-1/2's regression loss weight
    token_weight: float = 0.1  # EAGLE-1/2's token loss weight (EAGLE-3: 1)
    draft_vocab: int = 4096  # EAGLE-3's own vocabulary size
    lr: float = 5e-4

    def check(self) -> None:
        super().check()
        if self.variant not in VARIANTS:
            raise UserError(f"the EAGLE variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.ttt_steps < 0 or self.ttt_steps > 16:
            raise UserError(f"--ttt-steps must be in 0..16, got {self.ttt_steps}")
        if self.noise is not None and self.noise < 0:
            raise UserError(f"--noise must be >= 0, got {self.noise}")
        if self.variant == "eagle3" and self.draft_vocab < 16:
            raise UserError(f"--draft-vocab must be >= 16 for EAGLE-3 heads, got {self.draft_vocab}")

    @property
    def steps(self) -> int:
        return self.ttt_steps or (1 if self.variant == "eagle" else 3)

    @property
    def noise_width(self) -> float:
        return self.noise if self.noise is not None else (0.2 if self.variant == "eagle" else 0.0)


# ------------------------------------------------------------------------------ the command


def train_eagle(loaded, data: Path, out: Path, config: EagleFitConfig = EagleFitConfig(),
                console: Optional[Console] = None) -> FitResult:
    """Train EAGLE heads on `data` (ShareGPT jsonl) for the frozen `loaded` model; write them to `out`."""
    console = console or Console(stderr=True)
    config.check()
    check_out_folder(out, loaded, heads_key="eagle_variant", kind="EAGLE heads for ")
    start = time.perf_counter()
    layers = () if config.variant == "eagle" else (*eagle3_layers(text_config(loaded.model.config).num_hidden_layers), -1)
    train, held, info = prepare_sequences(loaded, data, config, console, layers)
    if not held:
        held = train[-1:]
    draft_vocab = None
    if config.variant == "eagle3":
        ranked, _ = ranked_tokens(Path(data), loaded.tokenizer, loaded.vocab_size, loaded.eos_token_ids)
        draft_vocab = torch.tensor(ranked[: config.draft_vocab])
    heads = new_eagle_heads(loaded.model, config.variant, draft_vocab)
    heads.depth = config.num_heads
    heads.requires_grad_(True)
    heads.decoder.get_input_embeddings().requires_grad_(False)  # a stub: the base embeddings are used
    console.print(f"EAGLE ({config.variant}): {config.steps} unrolled step(s), noise {config.noise_width}, "
                  f"{sum(p.numel() for p in heads.parameters() if p.requires_grad) / 1e6:.1f}M parameters")
    train, held = on_device(train, loaded.device), on_device(held, loaded.device)
    curve, info["stopping"] = fit(heads, train, held, config, log=lambda row: console.print(epoch_line(row), highlight=False))
    info["train_seconds"] = round(time.perf_counter() - start, 1)
    result = FitResult(Path(out), curve, info=info)
    result.best = write(heads, loaded, out, held, config, result)
    return result


# ------------------------------------------------------------------------------ optimisation


def split_rows(heads: EagleHeads, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached rows [T, W] -> (the draft's input features, the final normed state [T, H])."""
    H = heads.hidden_size
    if heads.variant == "eagle":
        return rows, rows
    return rows[:, :-H], rows[:, -H:]


def fit(heads: EagleHeads, train: list[Pair], held: list[Pair], config: EagleFitConfig,
        log: Optional[Callable[[dict], None]] = None) -> tuple[list[dict], dict]:
    vocab = active_vocab(torch.cat([seq.ids[seq.mask] for seq, _ in train])) if config.variant == "eagle" and config.softmax == "active" else None
    steps_per_epoch = len(batches(train, config.batch_size, torch.arange(len(train))))
    return train_loop(heads, lambda generator: batches(train, config.batch_size, torch.randperm(len(train), generator=generator)),
                      lambda batch: batch_loss(heads, batch, vocab, config), lambda: evaluate(heads, held, config.num_heads, config.top_k),
                      steps_per_epoch, config, log)


def batch_loss(heads: EagleHeads, batch: list[Pair], vocab: Optional[torch.Tensor], config: EagleFitConfig) -> torch.Tensor:
    """The mean over the batch's sequences of the depth-weighted loss (module docstring)."""
    return sum(sequence_loss(heads, seq, rows, vocab, config) for seq, rows in batch) / len(batch)


def sequence_loss(heads: EagleHeads, seq: Sequence, rows: torch.Tensor, vocab: Optional[torch.Tensor],
                  config: EagleFitConfig) -> torch.Tensor:
    features, final = split_rows(heads, rows.to(heads.dtype))
    if config.noise_width > 0:
        features = features + (torch.rand_like(features) - 0.5) * config.noise_width
    S = len(seq)
    t = torch.arange(S - 1, device=seq.ids.device)
    total = torch.zeros((), device=rows.device)
    base = heads.base_lm_head if vocab is None or heads.variant == "eagle3" else heads.base_lm_head[vocab]  # [V', H]
    if heads.variant == "eagle3":
        base = base[heads.draft_ids]  # the teacher over the draft vocabulary
        in_draft = heads.t2d
    for d, g in enumerate(heads.unroll(features, seq.ids, config.steps), start=1):
        target = t + d + 1  # row t at depth d drafts token t + d + 1
        ok = target < S
        ok[ok.clone()] &= seq.mask[target[ok]]
        if heads.variant == "eagle3":
            ok[ok.clone()] &= in_draft[seq.ids[target[ok]]]
        r = t[ok]
        if r.numel() == 0:
            continue
        with torch.no_grad():
            teacher = torch.softmax(F.linear(final[r + d], base).float(), dim=-1)  # [n, V']: the base's next-token distribution
        student = F.linear(g[r], base) if heads.variant == "eagle" else heads.logits(g[r])
        token = -(teacher * torch.log_softmax(student.float(), dim=-1)).sum(-1).mean()
        if heads.variant == "eagle":
            loss = config.feature_weight * F.smooth_l1_loss(g[r].float(), final[r + d].float()) + config.token_weight * token
        else:
            loss = token
        total = total + DEPTH_DECAY ** (d - 1) * loss
    return total


# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(heads: EagleHeads, held: list[Pair], depth: int, top_k: int = 10) -> dict:
    """Held-out metrics in the shared trainer's shape: per depth, counts of each rank of the data token
    among the drafting vocabulary (a token outside it is a miss); loss: depth 1's cross-entropy."""
    rank_counts = torch.zeros(depth, top_k, dtype=torch.long)
    valid = torch.zeros(depth, dtype=torch.long)
    loss_sum, loss_count = 0.0, 0
    for seq, rows in held:
        features, _ = split_rows(heads, rows.to(heads.dtype))
        S = len(seq)
        if S < 3:
            continue
        positions = torch.arange(S - 1, device=seq.ids.device)[seq.mask[1:]]  # roots inside the answer
        outs = heads.unroll(features, seq.ids, depth)  # one unroll for the ranks and the loss
        ranks = heads.ranks_of(outs, seq.ids, positions, top_k)  # [n, depth]
        for d in range(depth):
            r = ranks[:, d]
            target = positions + d + 2
            r = r[(r >= 0) & seq.mask[target.clamp(max=S - 1)]]
            valid[d] += r.numel()
            rank_counts[d] += torch.bincount(r[r < top_k].cpu(), minlength=top_k)[:top_k]
        g = outs[0]  # [S - 1, H]: depth 1
        t = torch.arange(S - 2, device=seq.ids.device)
        t = t[seq.mask[t + 2]]
        logits = heads.logits(g[t]).float()
        column = heads.column_of(seq.ids[t + 2])
        keep = column >= 0
        if keep.any():
            loss_sum += F.cross_entropy(logits[keep], column[keep], reduction="sum").item()
            loss_count += int(keep.sum())
    return {"loss": loss_sum / max(loss_count, 1), "rank_counts": rank_counts, "valid": valid}


# ------------------------------------------------------------------------------ writing


def write(heads: EagleHeads, loaded, out: Path, held: list[Pair], config: EagleFitConfig, result: FitResult) -> dict:
    """Save the heads in `config.save_dtype` (metrics re-measured on the stored weights), calibration, curve, log."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check = io.loaded_copy(heads, config.save_dtype).to(loaded.dtype)  # what loading the stored weights gives
    check.attach_base(loaded.model)
    metrics = evaluate(check, held, config.num_heads, config.top_k)
    best = {k.replace("_head", "_depth"): v for k, v in summary(metrics).items()}
    save_eagle_heads(heads, out, base_model_name_or_path=loaded.spec, dtype=io.storage_torch_dtype(config.save_dtype))
    io.finish_folder(out, config.save_dtype)
    meta = {"source": "held-out split of the training data", "model": loaded.spec, "heads_dtype": config.save_dtype,
            "variant": config.variant}
    ranks = conditional_ranks(check, held, lambda rows: split_rows(check, rows))
    save_calibration(statistics_of(ranks, config.top_k, meta), out / "calibration.json")
    write_curve(result.curve, out / "curve.csv")
    if config.variant == "eagle":  # EAGLE-3 heads carry their own draft vocabulary (d2t)
        write_draft_vocab(Path(result.info["data"]), loaded.tokenizer, out, loaded.vocab_size, loaded.eos_token_ids)
    io.write_json(out / "training.json", {"kind": config.variant, "model": loaded.spec, "config": asdict(config),
                                          "unrolled_steps": config.steps, "noise": config.noise_width, **result.info,
                                          "heldout": best})
    return best
