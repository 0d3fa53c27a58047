"""Medusa-2: LoRA on the backbone trained jointly with the heads.

Loss (the Medusa-2 recipe for self-distilled data): the backbone's KL to the frozen original
model's next-token distribution (so its answers stay the original's) plus
sum_k lambda * decay^k * CE(head k), lambda 0.2, decay 0.8. Gradients of the head losses
reach the backbone, which learns hidden states the heads can read. The heads are warmed up
first (a trained Medusa-1 folder via `init_heads`, or Medusa-1 epochs on cached hidden states).

The teacher's distribution comes from the frozen base's hidden states, computed once per
sequence and cached on disk (the same cache Medusa-1 training fills): lm_head(h) are its logits.
Output: a compact Medusa-2 *adapter* folder (peft `adapter_config.json` +
`adapter_model.safetensors`, heads in `medusa_lm_head.safetensors`, `config.json` naming the
base model), which the `medusa2` decoder merges into a copy of the base at load time; or a
full Medusa-2 model folder with `full_model=True`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from rich.console import Console

from medusa_bench.errors import UserError
from medusa_bench.heads import io
from medusa_bench.heads.medusa import MedusaHeads, load_heads, save_heads, save_medusa2
from medusa_bench.train.data import IGNORE, Sequence, head_targets, positions_of
from medusa_bench.train.fit import (FitConfig, FitResult, active_vocab, calibration_of, check_out_folder, epoch_line,
                                    evaluate, fit_heads, head_loss, prepare_sequences, summary, train_loop, write_curve)
from medusa_bench.train.vocab import write_draft_vocab
from medusa_bench.trees.tables import save_calibration

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class Medusa2Config(FitConfig):
    epochs: int = 10  # a maximum, as for every trainer: held-out head accuracy converging stops it
    batch_size: int = 4  # sequences per optimiser step (gradient accumulation)
    lr: float = 2e-4  # LoRA
    heads_lr: float = 5e-4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_layers: int = 0  # adapt only the last N decoder layers (0: all); fewer is cheaper on a CPU
    heads_coefficient: float = 0.2  # lambda
    heads_decay: float = 0.8
    init_heads: Optional[str] = None  # a trained Medusa-1 heads folder to start from
    warmup_epochs: int = 2  # Medusa-1 epochs on cached hidden states when init_heads is not given
    full_model: bool = False  # write a full merged model folder instead of the compact adapter

    def check(self) -> None:
        super().check()
        if self.lora_r < 1 or self.lora_layers < 0 or self.warmup_epochs < 0 or self.heads_lr <= 0:
            raise UserError("--lora-r must be >= 1, --lora-layers and --warmup-epochs >= 0, --heads-lr > 0")


# ------------------------------------------------------------------------------ the command


def train_medusa2(loaded, data: Path, out: Path, config: Medusa2Config = Medusa2Config(), console: Optional[Console] = None) -> FitResult:
    """Joint LoRA + heads training on `data` (ShareGPT jsonl); writes a Medusa-2 folder to `out`."""
    console = console or Console(stderr=True)
    config.check()
    check_out_folder(out, loaded)
    start = time.perf_counter()
    train, held, info = prepare_sequences(loaded, data, config, console)  # the same split as Medusa-1
    heads = initial_heads(loaded, config, train, held, console)
    student = make_student(loaded.model, config)
    heads.attach_lm_head(lm_head_of(student))
    heads.requires_grad_(True)
    curve, info["stopping"] = joint_fit(student, heads, train, held or train, config,
                                        log=lambda row: console.print(epoch_line(row) + f", KL {row['heldout_kl']:.4f}", highlight=False))
    info["train_seconds"] = round(time.perf_counter() - start, 1)
    result = FitResult(Path(out), curve, info=info)
    result.best = write_medusa2(student, heads, loaded, out, held or train, config, result)
    return result


def initial_heads(loaded, config: Medusa2Config, train: list, held: list, console: Console) -> MedusaHeads:
    """The warmed-up heads: a Medusa-1 folder, or Medusa-1 training on the frozen base first."""
    if config.init_heads:
        heads = load_heads(config.init_heads, base_model=loaded.model).to(loaded.dtype)
        if heads.num_heads != config.num_heads or not heads.shares_lm_head:
            raise UserError(f"--init-heads {config.init_heads} has {heads.num_heads} heads "
                            f"({'shared' if heads.shares_lm_head else 'own'} lm_head); pass --heads {heads.num_heads} "
                            "and heads that share the base lm_head")
        console.print(f"heads warm-started from {config.init_heads}")
        return heads
    heads = MedusaHeads.for_model(loaded.model, config.num_heads, config.num_layers, shared_lm_head=True)
    heads.requires_grad_(True)
    if config.warmup_epochs:
        console.print(f"warming up the heads: {config.warmup_epochs} Medusa-1 epochs on the frozen base")
        train_pos = positions_of(*zip(*train), config.num_heads)
        held_pos = positions_of(*zip(*(held or train)), config.num_heads)
        shared = {f.name: getattr(config, f.name) for f in fields(FitConfig)}
        warm = FitConfig(**{**shared, "epochs": config.warmup_epochs, "lr": config.heads_lr * 2, "batch_size": 256})
        fit_heads(heads, train_pos, held_pos, warm, log=lambda row: console.print("warm-up " + epoch_line(row), highlight=False))
    return heads


def make_student(model, config: Medusa2Config):
    """A peft LoRA model over a copy of `model` (the original stays untouched for the baseline)."""
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(model)
    layers = base.config.num_hidden_layers
    chosen = list(range(layers - config.lora_layers, layers)) if 0 < config.lora_layers < layers else None
    # Every linear layer inside the decoder layers (q/k/v/o and the MLP for llama-style models); never lm_head.
    targets = sorted({name.rsplit(".", 1)[-1] for name, module in base.get_decoder().named_modules()
                      if isinstance(module, torch.nn.Linear) and "layers." in name})
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=targets, layers_to_transform=chosen)
    return get_peft_model(base, lora)


def lm_head_of(student) -> torch.Tensor:
    return student.get_base_model().get_output_embeddings().weight  # [V, H], frozen


def decoder_of(student):
    return student.get_base_model().get_decoder()


# ------------------------------------------------------------------------------ training


def joint_fit(student, heads: MedusaHeads, train: list, held: list, config: Medusa2Config, log=None) -> tuple[list[dict], dict]:
    """AdamW on LoRA (lr) and heads (heads_lr) in fit.train_loop: its schedule, held-out evaluations and
    early stopping on the heads' mean top-1 on the adapted backbone (the KL is logged beside it).

    `train` and `held` are lists of (Sequence, base hidden [T, H]) pairs; a step accumulates the
    gradients of `batch_size` sequences, one backward each (one sequence's graph in memory at a time).
    """
    lora = [p for p in student.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW([{"params": lora, "lr": config.lr}, {"params": list(heads.parameters()), "lr": config.heads_lr}],
                                  weight_decay=config.weight_decay)
    vocab = active_vocab(torch.cat([head_targets(s, heads.num_heads).flatten() for s, _ in train])) if config.softmax == "active" else None
    weights = [config.heads_coefficient * config.heads_decay**k for k in range(heads.num_heads)]

    def epoch_batches(generator: torch.Generator):
        order = torch.randperm(len(train), generator=generator).tolist()
        return ([train[i] for i in order[begin: begin + config.batch_size]] for begin in range(0, len(order), config.batch_size))

    def backward(group: list) -> float:
        total = 0.0
        for seq, base in group:
            kl, head = joint_loss(student, heads, seq, base, vocab, weights)
            ((kl + head) / len(group)).backward()
            total += (kl + head).item() / len(group)
        return total

    both = torch.nn.ModuleDict({"student": student, "heads": heads})  # train_loop keeps the best trainable weights of both
    return train_loop(both, epoch_batches, backward, lambda: evaluate_joint(student, heads, held, config),
                      math.ceil(len(train) / config.batch_size), config, log, optimiser)


def joint_loss(student, heads: MedusaHeads, seq: Sequence, base: torch.Tensor, vocab, weights: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL of the adapted backbone to the original on assistant positions, weighted head loss).

    `base` [T, H] is the frozen original's last hidden state: lm_head(base) is the teacher.
    """
    lm_head = lm_head_of(student)  # [V, H]
    ids = seq.ids.unsqueeze(0).to(lm_head.device)  # [1, T]
    rows = seq.mask[1:].nonzero().squeeze(1).to(lm_head.device)  # positions t whose next token is the assistant's
    with torch.no_grad():
        teacher = F.log_softmax(F.linear(base.to(lm_head.device, lm_head.dtype)[rows], lm_head).float(), -1)  # [n, V]
    hidden = decoder_of(student)(input_ids=ids).last_hidden_state[0]  # [T, H]
    student_logp = F.log_softmax(F.linear(hidden[rows], lm_head).float(), -1)  # [n, V]
    kl = F.kl_div(student_logp, teacher, log_target=True, reduction="batchmean")
    targets = head_targets(seq, heads.num_heads)  # [T, K]
    keep = (targets != IGNORE).any(dim=1)
    return kl, head_loss(heads, hidden[keep.to(hidden.device)], targets[keep], vocab, weights)


@torch.no_grad()
def evaluate_joint(student, heads: MedusaHeads, held: list, config: Medusa2Config) -> dict:
    """Held-out KL to the original model and full-vocabulary head metrics on the adapted backbone."""
    kl_sum, rows_total, sequences, hidden = 0.0, 0, [], []
    for seq, base in held:
        lm_head = lm_head_of(student)
        rows = seq.mask[1:].nonzero().squeeze(1)
        h = decoder_of(student)(input_ids=seq.ids.unsqueeze(0).to(lm_head.device)).last_hidden_state[0]  # [T, H]
        teacher = F.log_softmax(F.linear(base.to(lm_head.device, lm_head.dtype)[rows], lm_head).float(), -1)
        kl = F.kl_div(F.log_softmax(F.linear(h[rows], lm_head).float(), -1), teacher, log_target=True, reduction="sum")
        kl_sum, rows_total = kl_sum + kl.item(), rows_total + rows.numel()
        sequences.append(seq)
        hidden.append(h.float().cpu())
    metrics = evaluate(heads, positions_of(sequences, hidden, heads.num_heads), config.top_k)
    metrics["kl"] = kl_sum / max(rows_total, 1)
    return metrics


# ------------------------------------------------------------------------------ writing


def round_adapter(student, dtype: torch.dtype) -> None:
    """Round the trained LoRA weights through the dtype they are written in, so the reported metrics are the files'."""
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.copy_(p.to(dtype).to(p.dtype))


def write_medusa2(student, heads: MedusaHeads, loaded, out: Path, held: list, config: Medusa2Config, result: FitResult) -> dict:
    """The adapter folder (or a full model folder), calibration.json, curve.csv and training.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # int8 keeps the adapter in bfloat16: peft reads it itself, and compress_folder leaves it alone.
    adapter_dtype = torch.bfloat16 if config.save_dtype == io.INT8 else io.storage_torch_dtype(config.save_dtype)
    round_adapter(student, adapter_dtype)
    check = io.loaded_copy(heads, config.save_dtype)  # what loading the stored heads gives, int8 included
    check.attach_lm_head(lm_head_of(student))  # share the student's lm_head, not the copy deepcopy made of it
    metrics = evaluate_joint(student, check, held, config)
    best = summary(metrics)
    if config.full_model:  # the heads go into the model's own weights, in the training dtype: write the checked values
        save_medusa2(out, student.merge_and_unload(), loaded.tokenizer, check)
    else:
        save_adapter(student, heads.to(io.storage_torch_dtype(config.save_dtype)), loaded, out, adapter_dtype)
        io.finish_folder(out, config.save_dtype)
    meta = {"source": "held-out split of the training data, on the adapted backbone", "model": loaded.spec, "heads_dtype": config.save_dtype}
    save_calibration(calibration_of(metrics, config.top_k, meta), out / "calibration.json")
    write_curve(result.curve, out / "curve.csv")
    write_draft_vocab(Path(result.info["data"]), loaded.tokenizer, out, loaded.vocab_size, loaded.eos_token_ids)
    io.write_json(out / "training.json", {"kind": "medusa2", "model": loaded.spec, "config": asdict(config), **result.info, "heldout": best})
    return best


def save_adapter(student, heads: MedusaHeads, loaded, out: Path, dtype: torch.dtype) -> None:
    """peft adapter (weights in `dtype`) + v2 heads + config.json naming the base model."""
    student.save_pretrained(out)
    tensors = io.load_tensors(out / ADAPTER_WEIGHTS)
    io.save_tensors(out / ADAPTER_WEIGHTS, {k: v.to(dtype) for k, v in tensors.items()})
    adapter_config = io.read_json(out / ADAPTER_CONFIG)
    adapter_config["base_model_name_or_path"] = loaded.spec
    io.write_json(out / ADAPTER_CONFIG, adapter_config)
    save_heads(heads, out, format="v2", base_model_name_or_path=loaded.spec)
    config = io.read_json(out / "config.json")
    config["medusa2_adapter"] = ADAPTER_WEIGHTS
    io.write_json(out / "config.json", config)
    (out / "README.md").unlink(missing_ok=True)  # peft's model-card stub
