"""Hydra head training on a frozen base model: teacher-forced on self-distilled conversations.

Head k at position t reads [state_t, E(ids[t+1]), …, E(ids[t+k+1])] and predicts ids[t+k+2]
(the tokens above it are the data's, as they are at decoding time once the path above is
accepted); loss on assistant tokens only. state_t is the base model's last hidden state
(`mlp`), or the output of the Hydra++ prefix layer run over the sequence's hidden states
(`prefix-mlp`, trained with the heads).

Losses (`--loss`): `data`, cross-entropy against the data tokens; `teacher`, cross-entropy
against the base model's own distribution for that token (softmax(lm_head(h[t+k+1])), the
Hydra++ recipe); `both`, their sum. Data loading, the cached base hidden states, the held-out
split, the active-vocabulary softmax and the learning-rate schedule are the Medusa trainer's
(`train/data.py`, `train/fit.py`); held-out accuracy and calibration use the full vocabulary.

A run writes: the heads (`hydra_lm_head.safetensors` + `config.json`), `calibration.json` (held-out
path-conditional statistics: P(rank at depth d | the path above accepted), for `--tree auto`),
`curve.csv` and `training.json`.
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
from medusa_bench.heads.hydra import ARCHS, HydraHeads, save_hydra_heads
from medusa_bench.train.data import Sequence
from medusa_bench.train.fit import (FitConfig, FitResult, active_vocab, check_out_folder, epoch_line, on_device, prepare_sequences,
                                    summary, train_loop, write_curve)
from medusa_bench.train.vocab import write_draft_vocab
from medusa_bench.trees.ranks import statistics_of
from medusa_bench.trees.tables import save_calibration

LOSSES = ("data", "teacher", "both")
Pair = tuple[Sequence, torch.Tensor]  # a sequence and its base hidden states [T, H]


@dataclass
class HydraFitConfig(FitConfig):
    """The Medusa trainer's settings plus the Hydra architecture and loss."""

    arch: str = "mlp"
    loss: str = "teacher"
    num_heads: int = 4

    def check(self) -> None:
        super().check()
        if self.arch not in ARCHS:
            raise UserError(f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.loss not in LOSSES:
            raise UserError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.num_layers < 1:
            raise UserError(f"--layers must be >= 1 for Hydra heads, got {self.num_layers}")


# ------------------------------------------------------------------------------ the command


def train_hydra(loaded, data: Path, out: Path, config: HydraFitConfig = HydraFitConfig(),
                console: Optional[Console] = None) -> FitResult:
    """Train Hydra heads on `data` (ShareGPT jsonl) for the frozen `loaded` model; write them to `out`."""
    console = console or Console(stderr=True)
    config.check()
    check_out_folder(out, loaded, heads_key="hydra_num_heads", kind="Hydra heads for ")
    start = time.perf_counter()
    train, held, info = prepare_sequences(loaded, data, config, console)
    if not held:
        held = train[-1:]  # no held-out split asked for: report on one training sequence
    heads = HydraHeads.for_model(loaded.model, config.num_heads, config.num_layers, config.arch,
                                 shared_lm_head=config.lm_head == "shared")
    heads.requires_grad_(True)
    train, held = on_device(train, loaded.device), on_device(held, loaded.device)
    curve, info["stopping"] = fit(heads, train, held, config, log=lambda row: console.print(epoch_line(row), highlight=False))
    info["train_seconds"] = round(time.perf_counter() - start, 1)
    result = FitResult(Path(out), curve, info=info)
    result.best = write(heads, loaded, out, held, config, result)
    return result


# ------------------------------------------------------------------------------ optimisation


def fit(heads: HydraHeads, train: list[Pair], held: list[Pair], config: HydraFitConfig,
        log: Optional[Callable[[dict], None]] = None) -> tuple[list[dict], dict]:
    """Hydra heads teacher-forced over batches of whole sequences (fit.train_loop's schedule and early stopping)."""
    vocab = active_vocab(torch.cat([seq.ids[seq.mask] for seq, _ in train])) if config.softmax == "active" else None
    steps_per_epoch = len(batches(train, config.batch_size, torch.arange(len(train))))
    return train_loop(heads, lambda generator: batches(train, config.batch_size, torch.randperm(len(train), generator=generator)),
                      lambda batch: batch_loss(heads, batch, vocab, config.loss), lambda: evaluate(heads, held, config.top_k),
                      steps_per_epoch, config, log)


def batches(pairs: list[Pair], targets_per_batch: int, order: torch.Tensor) -> list[list[Pair]]:
    """Whole sequences in `order`, grouped until a group holds about `targets_per_batch` assistant tokens."""
    out, current, count = [], [], 0
    for i in order.tolist():
        current.append(pairs[i])
        count += int(pairs[i][0].mask.sum())
        if count >= targets_per_batch:
            out.append(current)
            current, count = [], 0
    if current:
        out.append(current)
    return out


def head_examples(heads: HydraHeads, batch: list[Pair], k: int, states: list[torch.Tensor]):
    """Head k's teacher-forced rows of a batch: inputs [N, W], labels [N], teacher hidden [N, H].

    A row is a position t whose target ids[t + k + 2] is an assistant token; the teacher for it
    is the base hidden state at t + k + 1 (the one that predicts that token).
    """
    inputs, labels, teacher = [], [], []
    for (seq, hidden), state in zip(batch, states):
        T = len(seq)
        t = torch.arange(max(T - k - 2, 0), device=seq.ids.device)
        t = t[seq.mask[t + k + 2]]  # [n]
        inputs.append(heads.inputs_at(state, seq.ids, t, k))
        labels.append(seq.ids[t + k + 2])
        teacher.append(hidden[t + k + 1])
    return torch.cat(inputs), torch.cat(labels), torch.cat(teacher)


def head_states(heads: HydraHeads, batch: list[Pair]) -> list[torch.Tensor]:
    """The heads' input states [T, H] of each sequence (prefix layer output for Hydra++)."""
    return [heads.prefix_states(hidden[None].to(heads.dtype))[0] for _, hidden in batch]


def projection(heads: HydraHeads, k: int, vocab: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Head k's vocab projection (weight [V', H], bias [V'] or None), restricted to `vocab` if given."""
    if heads.shares_lm_head:
        weight, bias = heads.base_lm_head, None
    else:
        weight, bias = heads.hydra_lm_head[k].weight, heads.hydra_lm_head[k].bias
    if vocab is not None:
        weight, bias = weight[vocab], (bias[vocab] if bias is not None else None)
    return weight, bias


def batch_loss(heads: HydraHeads, batch: list[Pair], vocab: Optional[torch.Tensor], loss: str) -> torch.Tensor:
    """Sum over heads of the mean loss on the batch's assistant tokens (softmax over `vocab` if given)."""
    states = head_states(heads, batch)
    base = heads.base_lm_head if vocab is None else heads.base_lm_head[vocab]  # [V', H]: the teacher
    total = torch.zeros((), device=heads.base_lm_head.device)
    for k in range(heads.num_heads):
        inputs, labels, teacher_hidden = head_examples(heads, batch, k, states)
        if labels.numel() == 0:
            continue
        weight, bias = projection(heads, k, vocab)
        logits = F.linear(heads.hydra_mlp[k](inputs), weight, bias)  # [N, V']
        if loss in ("data", "both"):
            labels = torch.searchsorted(vocab, labels) if vocab is not None else labels  # index in the active vocabulary
            total = total + F.cross_entropy(logits, labels)
        if loss in ("teacher", "both"):
            with torch.no_grad():
                target = torch.softmax(F.linear(teacher_hidden, base), dim=-1)  # [N, V']
            total = total - (target * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
    return total


# ------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(heads: HydraHeads, held: list[Pair], top_k: int = 10) -> dict:
    """Full-vocabulary held-out metrics (the Medusa trainer's shape): mean data loss; per head, counts of each rank."""
    K = heads.num_heads
    rank_counts = torch.zeros(K, top_k, dtype=torch.long)
    valid = torch.zeros(K, dtype=torch.long)
    loss_sum = 0.0
    for pair in held:
        states = head_states(heads, [pair])
        for k in range(K):
            inputs, labels, _ = head_examples(heads, [pair], k, states)
            for begin in range(0, labels.numel(), 256):
                logits = heads.head_logits(k, inputs[begin: begin + 256]).float()  # [n, V]
                target = labels[begin: begin + 256]
                loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
                ranks = (logits > logits.gather(1, target[:, None])).sum(1)  # [n]
                valid[k] += ranks.numel()
                rank_counts[k] += torch.bincount(ranks[ranks < top_k].cpu(), minlength=top_k)[:top_k]
    return {"loss": loss_sum / max(int(valid.sum()), 1), "rank_counts": rank_counts, "valid": valid}


@torch.no_grad()
def conditional_ranks(heads, held: list[Pair], split: Optional[Callable] = None) -> torch.Tensor:
    """Rank rows [N, K] for the tree search, one per held-out position whose root is an assistant token.

    A depth counts only while the data follows the base model's greedy choice (the data tokens
    are then what greedy decoding would accept) and stays in the assistant's answer; -1 after.
    Any heads with `true_ranks(features, ids, positions, depth)`, `num_heads`, `base_lm_head`
    (Hydra's, EAGLE's); `split(hidden) -> (features, final normed state)` when the cached rows
    hold more than the final state (EAGLE-3).
    """
    rows = []
    for seq, hidden in held:
        T, K = len(seq), heads.num_heads
        positions = torch.arange(T - 1, device=seq.ids.device)[seq.mask[1:]]  # roots t + 1 inside the answer
        if positions.numel() == 0:
            continue
        features, final = split(hidden) if split is not None else (hidden, hidden)
        ranks = heads.true_ranks(features.to(heads.dtype), seq.ids, positions, K)  # [n, K]
        greedy = F.linear(final.to(heads.dtype), heads.base_lm_head).argmax(-1)  # [T]
        follows = seq.mask.clone()  # [T]: token s is an assistant token the greedy decoder would emit
        follows[1:] &= seq.ids[1:] == greedy[:-1]
        for d in range(K + 1):  # depth d (0 = the root) needs token t + 1 + d to follow
            s = positions + 1 + d
            ok = (s < T) & follows[s.clamp(max=T - 1)]
            ranks[~ok, max(d - 1, 0):] = -1
        rows.append(ranks)
    return torch.cat(rows).cpu() if rows else torch.full((0, heads.num_heads), -1, dtype=torch.long)


# ------------------------------------------------------------------------------ writing


def write(heads: HydraHeads, loaded, out: Path, held: list[Pair], config: HydraFitConfig, result: FitResult) -> dict:
    """Save the heads in `config.save_dtype` (metrics re-measured on the stored weights), calibration, curve, log."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check = io.loaded_copy(heads, config.save_dtype).to(loaded.dtype)  # what loading the stored weights gives
    check.attach_base(loaded.model)
    metrics = evaluate(check, held, config.top_k)
    best = summary(metrics)
    save_hydra_heads(heads, out, base_model_name_or_path=loaded.spec, dtype=io.storage_torch_dtype(config.save_dtype))
    io.finish_folder(out, config.save_dtype)
    meta = {"source": "held-out split of the training data", "model": loaded.spec, "heads_dtype": config.save_dtype,
            "arch": config.arch}
    save_calibration(statistics_of(conditional_ranks(check, held), config.top_k, meta), out / "calibration.json")
    write_curve(result.curve, out / "curve.csv")
    write_draft_vocab(Path(result.info["data"]), loaded.tokenizer, out, loaded.vocab_size, loaded.eos_token_ids)
    io.write_json(out / "training.json", {"kind": "hydra", "model": loaded.spec, "config": asdict(config), **result.info,
                                          "heldout": best})
    return best
