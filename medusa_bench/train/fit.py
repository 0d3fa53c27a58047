"""Medusa-1 head training on a frozen base model.

Head k at position t predicts the token at t + k + 2 (the base model itself predicts t + 1),
with loss on assistant tokens only. The base model never changes, so its hidden states are
computed once per sequence (`data.base_hidden_states`) and every epoch trains on those rows.

Cost on a CPU is the vocab projection: 4 heads x 49152 x 576 per position. By default the
training softmax runs over the *active vocabulary* (every token that is a target in the
training data), several times cheaper; held-out accuracy and calibration always use the
full vocabulary, so the numbers reported are what decoding will see.

A run writes into its output folder: the heads (v2 format with the shared lm_head, Medusa-1
with own projections), `calibration.json` (held-out per-head rank accuracy, the tree
optimiser's format), `curve.csv` (losses and accuracies at every evaluation), `training.json` (with why
training stopped), and
`draft_vocab.json` (answer-token frequencies: decoding may draft among the frequent tokens).
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from rich.console import Console

from medusa_bench.errors import UserError
from medusa_bench.heads import io
from medusa_bench.heads.medusa import MedusaHeads, save_heads
from medusa_bench.models import model_name
from medusa_bench.train.distill import describe_data
from medusa_bench.train.data import IGNORE, Positions, Sequence, base_hidden_states, load_sequences, positions_of, split_heldout
from medusa_bench.train.vocab import write_draft_vocab
from medusa_bench.trees.tables import Calibration, save_calibration


@dataclass
class FitConfig:
    num_heads: int = 4
    num_layers: int = 1
    lm_head: str = "shared"  # shared: heads end in the base lm_head (a few MB) | own: each head its own copy
    epochs: int = 50  # a maximum: convergence of held-out accuracy normally stops training first
    batch_size: int = 256  # positions per optimiser step
    lr: float = 1e-3
    weight_decay: float = 0.0
    heldout: float = 0.05  # fraction of sequences held out (whole sequences)
    eval_every: Optional[int] = None  # optimiser steps between held-out evaluations (None: sized to EVAL_SHARE)
    patience: int = 3  # evaluations without a held-out top-1 gain above min_delta before a plateau
    min_delta: float = 0.001  # the smallest gain in mean held-out top-1 that counts as progress
    max_minutes: Optional[float] = None  # optional safety cap on the optimisation (not the caching)
    max_length: Optional[int] = None  # tokens per sequence (default: the model's context)
    softmax: str = "active"  # active | full
    top_k: int = 10  # ranks per depth in calibration.json
    save_dtype: str = "bfloat16"  # float32 | float16 | bfloat16 for the written weights (loaders upcast)
    seed: int = 0
    hidden_cache: Optional[str] = None  # folder for the base hidden states (default: user cache; "none": off)

    def check(self) -> None:
        if self.num_heads < 1:
            raise UserError(f"--heads must be >= 1, got {self.num_heads}")
        if self.num_layers < 0:
            raise UserError(f"--layers must be >= 0, got {self.num_layers}")
        if self.lm_head not in ("shared", "own"):
            raise UserError(f"--lm-head must be 'shared' or 'own', got {self.lm_head!r}")
        if self.softmax not in ("active", "full"):
            raise UserError(f"--softmax must be 'active' or 'full', got {self.softmax!r}")
        if self.save_dtype not in io.STORAGE_DTYPES:
            raise UserError(f"--save-dtype must be one of {', '.join(io.STORAGE_DTYPES)}, got {self.save_dtype!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.top_k < 1 or self.lr <= 0:
            raise UserError("--epochs, --batch-size and --top-k must be >= 1 and --lr > 0")
        if not 0 <= self.heldout < 1:
            raise UserError(f"--heldout must be a fraction in [0, 1), got {self.heldout}")
        if self.patience < 1 or self.min_delta < 0 or (self.eval_every is not None and self.eval_every < 1):
            raise UserError("--patience and --eval-every must be >= 1 and --min-delta >= 0")


@dataclass
class FitResult:
    out: Path
    curve: list[dict] = field(default_factory=list)  # one row per held-out evaluation
    best: dict = field(default_factory=dict)  # held-out metrics of the kept weights
    info: dict = field(default_factory=dict)  # data sizes, times, dtype check


# ------------------------------------------------------------------------------ the command


def train_medusa(loaded, data: Path, out: Path, config: FitConfig = FitConfig(), console: Optional[Console] = None) -> FitResult:
    """Train Medusa-1 heads on `data` (ShareGPT jsonl) for the frozen `loaded` model; write them to `out`."""
    console = console or Console(stderr=True)
    config.check()
    check_out_folder(out, loaded)
    start = time.perf_counter()
    train_pos, held_pos, info = prepare_positions(loaded, data, config, console)
    heads = MedusaHeads.for_model(loaded.model, config.num_heads, config.num_layers, shared_lm_head=config.lm_head == "shared")
    heads.requires_grad_(True)
    curve, info["stopping"] = fit_heads(heads, train_pos, held_pos, config, log=lambda row: console.print(epoch_line(row), highlight=False))
    info["train_seconds"] = round(time.perf_counter() - start, 1)
    result = FitResult(Path(out), curve, info=info)
    result.best = write_heads(heads, loaded, out, held_pos, config, result)
    return result


def prepare_positions(loaded, data: Path, config: FitConfig, console: Console) -> tuple[Positions, Positions, dict]:
    """Tokenise, split held-out sequences, and get the base hidden states (once per sequence)."""
    train_pairs, held_pairs, info = prepare_sequences(loaded, data, config, console)
    train_pos = positions_of(*zip(*train_pairs), config.num_heads)
    held_pos = positions_of(*zip(*held_pairs), config.num_heads) if held_pairs else Positions(train_pos.hidden[:0], train_pos.targets[:0])
    info.update(train_targets=train_pos.tokens, heldout_targets=held_pos.tokens)
    if len(train_pos) == 0:
        raise UserError(f"{data}: no assistant tokens to train on")
    return train_pos, held_pos, info


def prepare_sequences(loaded, data: Path, config: FitConfig, console: Console,
                      layers: tuple[int, ...] = ()) -> tuple[list, list, dict]:
    """(train, held-out) lists of (Sequence, base hidden [T, H]) pairs, split by whole sequences
    (with `layers`: those hidden states concatenated, [T, k * H], data.base_hidden_states)."""
    sequences = load_sequences(loaded, data, config.max_length)
    tokens = sum(len(s) for s in sequences)
    done = {"tokens": 0}
    began = time.perf_counter()
    with console.status("") as status:
        def tick(n: int) -> None:
            done["tokens"] += n
            rate = done["tokens"] / max(time.perf_counter() - began, 1e-9)
            status.update(f"base hidden states: {done['tokens']}/{tokens} tokens · {rate:5.0f} tok/s")

        cache = False if config.hidden_cache == "none" else config.hidden_cache
        hidden = base_hidden_states(loaded, sequences, cache, tick, layers)
    train, held = split_heldout(list(zip(sequences, hidden)), config.heldout, config.seed)
    info = {"data": str(data), "sequences": len(sequences), "train_sequences": len(train), "heldout_sequences": len(held),
            "tokens": tokens, "assistant_tokens": int(sum(int(s.mask.sum()) for s in sequences)),
            "hidden_seconds": round(time.perf_counter() - began, 1), "data_recipe": describe_data(data)}
    console.print(f"{len(sequences)} sequences ({len(held)} held out), {tokens} tokens ({info['assistant_tokens']} assistant); "
                  f"base hidden states in {info['hidden_seconds']} s")
    return train, held, info


def on_device(pairs: list, device: torch.device) -> list:
    """(Sequence, cached rows) pairs moved to `device` once (the heads' device: the GPU path), so every
    batch and evaluation indexes tensors where the heads are; the CPU path gets the same objects back."""
    if torch.device(device).type == "cpu":
        return pairs
    return [(Sequence(seq.ids.to(device), seq.mask.to(device)), rows.to(device)) for seq, rows in pairs]


def check_out_folder(out: Path, loaded, heads_key: str = "medusa_num_heads", kind: str = "") -> None:
    """Refuse an output folder that holds another model's heads, or heads of another kind
    (config.json without `heads_key`); retraining this model's heads of this kind is fine."""
    config_path = Path(out) / "config.json"
    if not config_path.is_file():
        return
    config = io.read_json(config_path)
    base = config.get("base_model_name_or_path")
    hidden = config.get("hidden_size")
    same_name = base is None or base in (loaded.spec, loaded.source) or model_name(str(base)) == loaded.name
    if not same_name or (hidden is not None and hidden != loaded.hidden_size) or heads_key not in config:
        what = f"heads for {base}" if base else "another model's files"
        raise UserError(f"{out} already holds {what}, not {kind}{loaded.spec}: pass a new --out folder (or delete that one)")


# ------------------------------------------------------------------------------ optimisation


def fit_heads(heads: MedusaHeads, train: Positions, held: Positions, config: FitConfig,
              log: Optional[Callable[[dict], None]] = None) -> tuple[list[dict], dict]:
    """Medusa heads on cached positions: shuffled batches of `batch_size` positions."""
    vocab = active_vocab(train.targets) if config.softmax == "active" else None

    def epoch_batches(generator: torch.Generator):
        order = torch.randperm(len(train), generator=generator)
        return (order[begin: begin + config.batch_size] for begin in range(0, len(train), config.batch_size))

    return train_loop(heads, epoch_batches, lambda rows: head_loss(heads, train.hidden[rows], train.targets[rows], vocab),
                      lambda: evaluate(heads, held if len(held) else train, config.top_k),
                      math.ceil(len(train) / config.batch_size), config, log)


# The learning rate: a linear warm-up, then constant, dropping to PLATEAU_FACTOR of itself each time
# held-out accuracy plateaus (`patience` evaluations without a gain above `min_delta`); the plateau
# after PLATEAU_DROPS drops stops the run ("converged"). A cosine over the maximum epochs would still
# be near its peak when convergence stops a run early; decaying on plateau ends every run on a small rate.
PLATEAU_FACTOR = 0.3
PLATEAU_DROPS = 2
# eval_every=None sizes the interval after a first evaluation at PROBE_STEPS: evaluations then take
# about EVAL_SHARE of the training time, whatever the trainer, held-out size and device, and come
# at least once an epoch: Medusa-1 on 103 conversations (fp32, Zen 4) evaluated in ~7.5 s against
# 0.075 s a step, which alone spaced evaluations 990 steps (11 epochs) apart; the heads overfitted
# from epoch ~5 and ran to the 50-epoch maximum between evaluations.
EVAL_SHARE = 0.1
PROBE_STEPS = 20


@dataclass
class Progress:
    """train_loop's state between evaluations."""

    step: int = 0
    since: int = 0  # steps since the last evaluation
    losses: list = field(default_factory=list)  # training losses since the last evaluation
    train_seconds: float = 0.0  # optimiser time only (no evaluations)
    best: float = -math.inf  # best mean held-out top-1 so far
    best_step: int = 0
    best_state: Optional[dict] = None
    stale: int = 0  # evaluations since `best` last improved by more than min_delta
    drops: int = 0  # plateau drops of the learning rate so far
    scale: float = 1.0  # PLATEAU_FACTOR ** drops


def train_loop(model: torch.nn.Module, epoch_batches: Callable[[torch.Generator], Iterable], loss_of: Callable[[Any], Any],
               held_out: Callable[[], dict], steps_per_epoch: int, config: FitConfig,
               log: Optional[Callable[[dict], None]] = None,
               optimiser: Optional[torch.optim.Optimizer] = None) -> tuple[list[dict], dict]:
    """AdamW (or `optimiser`) with warm-up and decay on plateau; a held-out evaluation every `eval_every`
    steps; stops when mean held-out top-1 converges and keeps the weights of the best evaluation.

    Shared by every head trainer: `epoch_batches(generator)` gives one epoch's batches; `loss_of(batch)`
    their loss, a tensor (train_loop runs backward) or a float (the trainer ran backward itself,
    accumulating per sequence); `held_out()` the held-out metrics (`evaluate`'s shape). Returns the
    curve (one row per evaluation) and `stopping` (why and where it stopped, for training.json).
    """
    generator = torch.Generator().manual_seed(config.seed)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimiser = optimiser or torch.optim.AdamW(list(trainable.values()), lr=config.lr, weight_decay=config.weight_decay)
    peaks = [group["lr"] for group in optimiser.param_groups]
    warmup = max(1, min(100, steps_per_epoch // 20))
    deadline = time.perf_counter() + config.max_minutes * 60 if config.max_minutes else math.inf
    every = config.eval_every or min(PROBE_STEPS, steps_per_epoch)
    began = time.perf_counter()
    curve: list[dict] = []
    p = Progress()

    def evaluate_now() -> bool:
        """One curve row; True when the last plateau is reached (converged)."""
        nonlocal every
        clock = time.perf_counter()
        metrics = held_out()
        eval_seconds = time.perf_counter() - clock
        if config.eval_every is None and not curve and p.step:  # the probe: evaluations ~EVAL_SHARE of the time from here on
            every = min(steps_per_epoch, max(1, math.ceil(eval_seconds / (EVAL_SHARE * p.train_seconds / p.step))))
        row = {"epoch": round(p.step / steps_per_epoch, 3), "steps": p.step, "seconds": round(time.perf_counter() - began, 1),
               "lr": float(f"{optimiser.param_groups[0]['lr']:.3g}"),
               "train_loss": round(sum(p.losses) / max(len(p.losses), 1), 4), **summary(metrics)}
        curve.append(row)
        if log:
            log(row)
        p.since, p.losses = 0, []
        accuracy = mean_top1(metrics)
        if accuracy > p.best + config.min_delta:
            p.best, p.best_step, p.stale = accuracy, p.step, 0
            p.best_state = {name: value.detach().clone() for name, value in trainable.items()}
            return False
        p.stale += 1
        if p.stale < config.patience:
            return False
        if p.drops == PLATEAU_DROPS:
            return True
        p.drops, p.scale, p.stale = p.drops + 1, p.scale * PLATEAU_FACTOR, 0
        return False

    stopped = "max epochs"
    for _ in range(config.epochs):
        for batch in epoch_batches(generator):
            clock = time.perf_counter()
            factor = p.scale * min(1.0, (p.step + 1) / warmup)
            for group, peak in zip(optimiser.param_groups, peaks):
                group["lr"] = peak * factor
            optimiser.zero_grad(set_to_none=True)
            loss = loss_of(batch)
            if isinstance(loss, torch.Tensor):
                loss.backward()
                loss = loss.item()
            optimiser.step()
            p.losses.append(loss)
            p.step, p.since = p.step + 1, p.since + 1
            p.train_seconds += time.perf_counter() - clock
            if p.since >= every and evaluate_now():
                stopped = "converged"
                break
            if time.perf_counter() > deadline:
                stopped = "time cap"
                break
        if stopped != "max epochs":
            break
    if p.since or not curve:  # the steps after the last evaluation count too
        evaluate_now()
    with torch.no_grad():
        for name, value in p.best_state.items():
            trainable[name].copy_(value)
    return curve, {"stopped": stopped, "steps": p.step, "epochs": round(p.step / steps_per_epoch, 3),
                   "best_step": p.best_step, "best_top1_mean": round(p.best, 4), "eval_every": every,
                   "lr_drops": p.drops, "evaluations": len(curve)}


def mean_top1(metrics: dict) -> float:
    """Held-out top-1 accuracy averaged over heads (or draft depths): what early stopping watches."""
    counts, valid = metrics["rank_counts"], metrics["valid"].clamp(min=1)
    return float((counts[:, 0].double() / valid.double()).mean())


def active_vocab(targets: torch.Tensor) -> torch.Tensor:
    """The sorted token ids that are targets somewhere: LongTensor [V']."""
    return torch.unique(targets[targets != IGNORE])


def head_features(heads: MedusaHeads, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [N, H] → each head's ResBlock output [K, N, H] (what its vocab projection reads).

    Mirrors the ResBlock part of MedusaHeads._logits, so training can project onto a subset.
    """
    K = heads.num_heads
    y = hidden.to(heads.res_weight.device, heads.res_weight.dtype).unsqueeze(0).expand(K, -1, -1)  # [K, N, H]
    for layer in range(heads.num_layers):
        y = y + F.silu(torch.baddbmm(heads.res_bias[layer].unsqueeze(1), y, heads.res_weight[layer].mT))
    return y


def head_logits(heads: MedusaHeads, hidden: torch.Tensor, vocab: Optional[torch.Tensor] = None) -> torch.Tensor:
    """hidden [N, H] → logits [K, N, V] over the full vocabulary, or [K, N, V'] over `vocab`."""
    y = head_features(heads, hidden)  # [K, N, H]
    if heads.shares_lm_head:
        weight = heads.lm_head_weight if vocab is None else heads.lm_head_weight[vocab]  # [V', H]
        return F.linear(y.to(weight.dtype), weight)
    weight = heads.proj_weight if vocab is None else heads.proj_weight[:, vocab]  # [K, V', H]
    return torch.bmm(y, weight.mT)


def head_loss(heads: MedusaHeads, hidden: torch.Tensor, targets: torch.Tensor, vocab: Optional[torch.Tensor] = None,
              weights: Optional[list[float]] = None) -> torch.Tensor:
    """Mean (or `weights`-weighted sum of per-head mean) cross-entropy over valid targets [N, K]."""
    logits = head_logits(heads, hidden, vocab)  # [K, N, V']
    labels = targets.T.to(logits.device)  # [K, N]
    if vocab is not None:
        remap = torch.full((int(vocab.max()) + 1,), IGNORE, dtype=torch.long, device=labels.device)
        remap[vocab.to(labels.device)] = torch.arange(vocab.numel(), device=labels.device)
        labels = torch.where(labels == IGNORE, labels, remap[labels.clamp(min=0, max=remap.numel() - 1)])
    if weights is None:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)
    total = logits.new_zeros(())
    for k, w in enumerate(weights):
        if (labels[k] != IGNORE).any():
            total = total + w * F.cross_entropy(logits[k], labels[k], ignore_index=IGNORE)
    return total


@torch.no_grad()
def evaluate(heads: MedusaHeads, positions: Positions, top_k: int = 10, chunk: int = 512) -> dict:
    """Full-vocabulary held-out metrics: mean loss, and per head the counts of each rank < top_k."""
    K = heads.num_heads
    rank_counts = torch.zeros(K, top_k, dtype=torch.long)
    valid = torch.zeros(K, dtype=torch.long)
    loss_sum = 0.0
    for begin in range(0, len(positions), chunk):
        logits = head_logits(heads, positions.hidden[begin: begin + chunk]).float()  # [K, n, V]
        labels = positions.targets[begin: begin + chunk].T.to(logits.device)  # [K, n]
        ok = labels != IGNORE
        loss_sum += F.cross_entropy(logits[ok], labels[ok], reduction="sum").item() if ok.any() else 0.0
        true = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1))  # [K, n, 1]
        ranks = (logits > true).sum(-1)  # [K, n]
        for k in range(K):
            r = ranks[k][ok[k]]
            valid[k] += r.numel()
            rank_counts[k] += torch.bincount(r[r < top_k].cpu(), minlength=top_k)[:top_k]
    total = int(valid.sum())
    return {"loss": loss_sum / max(total, 1), "rank_counts": rank_counts, "valid": valid}


def summary(metrics: dict) -> dict:
    """Loss, mean top-1 and per-head top-1 / top-5 accuracy (and Medusa-2's KL) as a flat dict (one CSV row)."""
    counts, valid = metrics["rank_counts"], metrics["valid"].clamp(min=1)
    row = {"heldout_loss": round(metrics["loss"], 4), "top1_mean": round(mean_top1(metrics), 4)}
    for k in range(counts.shape[0]):
        row[f"top1_head{k}"] = round(counts[k, 0].item() / valid[k].item(), 4)
        row[f"top5_head{k}"] = round(counts[k, :5].sum().item() / valid[k].item(), 4)
    if "kl" in metrics:
        row["heldout_kl"] = round(metrics["kl"], 5)
    return row


def epoch_line(row: dict) -> str:
    heads = sorted(int(k[len("top1_head"):]) for k in row if k.startswith("top1_head"))
    top1 = "/".join(f"{row[f'top1_head{k}']:.3f}" for k in heads)
    top5 = "/".join(f"{row[f'top5_head{k}']:.3f}" for k in heads)
    return (f"step {row['steps']} (epoch {row['epoch']:.2f}, {row['seconds']:.0f} s, lr {row['lr']:.2g}): "
            f"train loss {row['train_loss']:.3f}, held-out loss {row['heldout_loss']:.3f}, top-1 {top1}, top-5 {top5}")


# ------------------------------------------------------------------------------ writing


def calibration_of(metrics: dict, top_k: int, meta: dict) -> Calibration:
    """calibration.json rows: accuracy[depth][rank] = P(true token at that depth is the head's rank-r candidate)."""
    counts, valid = metrics["rank_counts"], metrics["valid"].clamp(min=1)
    accuracy = [[round(counts[k, r].item() / valid[k].item(), 6) for r in range(top_k)] for k in range(counts.shape[0])]
    return Calibration("independent", top_k, accuracy=accuracy, samples=int(metrics["valid"].min()), meta=meta)


def write_heads(heads: MedusaHeads, loaded, out: Path, held: Positions, config: FitConfig, result: FitResult) -> dict:
    """Save the heads in `config.save_dtype` (checked on held-out data), calibration, curve and log; return metrics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stored = heads.to(io.storage_torch_dtype(config.save_dtype))
    stored.attach_base(loaded.model)
    # The metrics of what is written: the stored weights, computed in the base model's dtype.
    check = io.loaded_copy(stored, config.save_dtype).to(loaded.dtype)
    check.attach_base(loaded.model)
    metrics = evaluate(check, held, config.top_k)
    best = summary(metrics)
    save_heads(stored, out, format="v2" if stored.shares_lm_head else "medusa1", base_model_name_or_path=loaded.spec)
    io.finish_folder(out, config.save_dtype)
    meta = {"source": "held-out split of the training data", "model": loaded.spec, "heads_dtype": config.save_dtype}
    save_calibration(calibration_of(metrics, config.top_k, meta), out / "calibration.json")
    write_curve(result.curve, out / "curve.csv")
    write_draft_vocab(Path(result.info["data"]), loaded.tokenizer, out, loaded.vocab_size, loaded.eos_token_ids)
    kept = next(r for r in result.curve if r["steps"] == result.info["stopping"]["best_step"])
    result.info["saved_dtype_check"] = {"float32_best_evaluation": kept, config.save_dtype: best}
    io.write_json(out / "training.json", {"kind": "medusa", "model": loaded.spec, "config": asdict(config), **result.info, "heldout": best})
    return best


def write_curve(curve: list[dict], path: Path) -> None:
    if not curve:
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(curve[0]))
        writer.writeheader()
        writer.writerows(curve)
