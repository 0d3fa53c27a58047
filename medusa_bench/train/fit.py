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
optimiser's format), `curve.csv` (per-epoch losses and accuracies), `training.json`, and
`draft_vocab.json` (answer-token frequencies: decoding may draft among the frequent tokens).
"""

from __future__ import annotations

import copy
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
from medusa_bench.models import DTYPES, model_name
from medusa_bench.train.distill import describe_data
from medusa_bench.train.data import IGNORE, Positions, base_hidden_states, load_sequences, positions_of, split_heldout
from medusa_bench.train.vocab import write_draft_vocab
from medusa_bench.trees.search import Calibration, save_calibration


@dataclass
class FitConfig:
    num_heads: int = 4
    num_layers: int = 1
    lm_head: str = "shared"  # shared: heads end in the base lm_head (a few MB) | own: each head its own copy
    epochs: int = 10
    batch_size: int = 256  # positions per optimiser step
    lr: float = 1e-3
    weight_decay: float = 0.0
    heldout: float = 0.05  # fraction of sequences held out (whole sequences)
    patience: int = 2  # epochs without held-out improvement before stopping
    max_minutes: Optional[float] = None  # wall-clock cap on the optimisation (not the caching)
    max_length: Optional[int] = None  # tokens per sequence (default: the model's context)
    softmax: str = "active"  # active | full
    top_k: int = 10  # ranks per depth in calibration.json
    save_dtype: str = "float16"  # float32 | float16 | bfloat16 for the written weights
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
        if self.save_dtype not in DTYPES:
            raise UserError(f"--save-dtype must be one of {', '.join(DTYPES)}, got {self.save_dtype!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.top_k < 1 or self.lr <= 0:
            raise UserError("--epochs, --batch-size and --top-k must be >= 1 and --lr > 0")
        if not 0 <= self.heldout < 1:
            raise UserError(f"--heldout must be a fraction in [0, 1), got {self.heldout}")


@dataclass
class FitResult:
    out: Path
    curve: list[dict] = field(default_factory=list)  # one row per epoch
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
    curve = fit_heads(heads, train_pos, held_pos, config, log=lambda row: console.print(epoch_line(row), highlight=False))
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
              log: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Medusa heads on cached positions: shuffled batches of `batch_size` positions."""
    vocab = active_vocab(train.targets) if config.softmax == "active" else None

    def epoch_batches(generator: torch.Generator):
        order = torch.randperm(len(train), generator=generator)
        return (order[begin: begin + config.batch_size] for begin in range(0, len(train), config.batch_size))

    return train_loop(heads, epoch_batches, lambda rows: head_loss(heads, train.hidden[rows], train.targets[rows], vocab),
                      lambda: evaluate(heads, held if len(held) else train, config.top_k),
                      math.ceil(len(train) / config.batch_size), config, log)


def train_loop(heads: torch.nn.Module, epoch_batches: Callable[[torch.Generator], Iterable], loss_of: Callable[[Any], torch.Tensor],
               held_out: Callable[[], dict], steps_per_epoch: int, config: FitConfig,
               log: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """AdamW with warm-up + cosine decay; early stopping on held-out loss; keeps the best weights.

    Shared by every head trainer: `epoch_batches(generator)` gives one epoch's batches,
    `loss_of(batch)` their loss, `held_out()` the held-out metrics (`evaluate`'s shape).
    """
    generator = torch.Generator().manual_seed(config.seed)
    params = [p for p in heads.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    budget = config.max_minutes * 60 if config.max_minutes else None
    schedule = warmup_cosine(optimiser, total=config.epochs * steps_per_epoch, budget_seconds=budget)
    deadline = time.perf_counter() + budget if budget else math.inf
    curve, best_loss, best_state, stale, step = [], math.inf, None, 0, 0
    began = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        losses = []
        for batch in epoch_batches(generator):
            loss = loss_of(batch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            if time.perf_counter() > deadline:
                break
        metrics = held_out()
        row = {"epoch": epoch, "steps": step, "seconds": round(time.perf_counter() - began, 1),
               "train_loss": round(sum(losses) / max(len(losses), 1), 4), **summary(metrics)}
        curve.append(row)
        if log:
            log(row)
        if metrics["loss"] < best_loss:
            best_loss, best_state, stale = metrics["loss"], copy.deepcopy(heads.state_dict()), 0
        else:
            stale += 1
        if stale > config.patience or time.perf_counter() > deadline:
            break
    heads.load_state_dict(best_state)
    return curve


def warmup_cosine(optimiser, total: int, warmup: Optional[int] = None, budget_seconds: Optional[float] = None):
    """Linear warm-up, then cosine decay to zero at `total` steps or at `budget_seconds` (a
    --max-minutes cap), whichever comes first: a capped run still ends on a small learning rate
    instead of being cut at its peak (ten times the data made one epoch outlast the cap)."""
    warmup = warmup if warmup is not None else max(1, min(100, total // 20))
    began = time.perf_counter()

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if budget_seconds:
            progress = max(progress, (time.perf_counter() - began) / budget_seconds)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def active_vocab(targets: torch.Tensor) -> torch.Tensor:
    """The sorted token ids that are targets somewhere: LongTensor [V']."""
    return torch.unique(targets[targets != IGNORE])


def head_features(heads: MedusaHeads, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [N, H] → each head's ResBlock output [K, N, H] (what its vocab projection reads).

    Mirrors the ResBlock part of MedusaHeads._logits, so training can project onto a subset.
    """
    K = heads.num_heads
    y = hidden.to(heads.res_weight.dtype).unsqueeze(0).expand(K, -1, -1)  # [K, N, H]
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
    """Loss and per-head top-1 / top-5 accuracy as a flat dict (one CSV row)."""
    counts, valid = metrics["rank_counts"], metrics["valid"].clamp(min=1)
    row = {"heldout_loss": round(metrics["loss"], 4)}
    for k in range(counts.shape[0]):
        row[f"top1_head{k}"] = round(counts[k, 0].item() / valid[k].item(), 4)
        row[f"top5_head{k}"] = round(counts[k, :5].sum().item() / valid[k].item(), 4)
    return row


def epoch_line(row: dict) -> str:
    heads = sorted(int(k[len("top1_head"):]) for k in row if k.startswith("top1_head"))
    top1 = "/".join(f"{row[f'top1_head{k}']:.3f}" for k in heads)
    top5 = "/".join(f"{row[f'top5_head{k}']:.3f}" for k in heads)
    return (f"epoch {row['epoch']} ({row['steps']} steps, {row['seconds']:.0f} s): train loss {row['train_loss']:.3f}, "
            f"held-out loss {row['heldout_loss']:.3f}, top-1 {top1}, top-5 {top5}")


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
    stored = heads.to(DTYPES[config.save_dtype])
    stored.attach_base(loaded.model)
    # The metrics of what is written: the stored weights, computed in the base model's dtype.
    check = copy.deepcopy(stored).to(loaded.dtype)
    check.attach_base(loaded.model)
    metrics = evaluate(check, held, config.top_k)
    best = summary(metrics)
    save_heads(stored, out, format="v2" if stored.shares_lm_head else "medusa1", base_model_name_or_path=loaded.spec)
    meta = {"source": "held-out split of the training data", "model": loaded.spec, "heads_dtype": config.save_dtype}
    save_calibration(calibration_of(metrics, config.top_k, meta), out / "calibration.json")
    write_curve(result.curve, out / "curve.csv")
    write_draft_vocab(Path(result.info["data"]), loaded.tokenizer, out, loaded.vocab_size, loaded.eos_token_ids)
    result.info["saved_dtype_check"] = {"float32_best_epoch": min(result.curve, key=lambda r: r["heldout_loss"]), config.save_dtype: best}
    io.write_json(out / "training.json", {"kind": "medusa", "model": loaded.spec, "config": asdict(config), **result.info, "heldout": best})
    return best


def write_curve(curve: list[dict], path: Path) -> None:
    if not curve:
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(curve[0]))
        writer.writeheader()
        writer.writerows(curve)
