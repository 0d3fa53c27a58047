"""The commands that make training data and heads: `distill`, `instructions`, `datastore build`, `train …`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from medusa_bench.cli.app import app, canonical_dtype, console, datastore_app, train_app


# ------------------------------------------------------------------------- distill and train
@app.command()
def distill(
    prompts: List[Path] = typer.Option([], "--prompts", "-p", help="Prompt files: self_instruct, GSM8K train, ShareGPT (repeat the option); the 64 self-instruct prompts `--tree auto` calibrates on are left out."),
    out: Path = typer.Option(..., "--out", "-o", help="Output ShareGPT jsonl (appended; re-run to resume)."),
    extend: List[Path] = typer.Option([], "--extend", help="Conversations an earlier distill wrote: keep their answers, add the --follow-up turn."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Hub id, local folder, .gguf file or 'smollm2-135m'."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", help="Token limit per answer."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    samples_per_prompt: int = typer.Option(1, "--samples-per-prompt", help="Sampled answers per prompt (needs --temperature > 0)."),
    follow_up: str = typer.Option("none", "--follow-up", help="Second turn for one-turn prompts: none | generic | model (the model writes the user's next question)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Conversations generated and written together (sorted by length; a killed run loses at most one batch); greedy answers stream through 64 decoding slots."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N prompts from each file."),
    seed: int = typer.Option(0, "--seed"),
    pack: Optional[Path] = typer.Option(None, "--pack", help="Distillation pack folder: skip what it holds, seal every full group of --out into it."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", "--dtype", callback=canonical_dtype, help="auto (on a CPU: bf16 where a 64-row step measures faster, else fp32) | float32 | float16 | bfloat16 (or fp32, fp16, bf16)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
) -> None:
    """Self-distillation: the model answers training prompts (never benchmark questions); ShareGPT jsonl out."""
    from medusa_bench.train.distill import distill as run_distill

    loaded = _generating_model(model, device, dtype, trust_remote_code)
    result = run_distill(loaded, prompts, out, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         samples_per_prompt=samples_per_prompt, follow_up=follow_up, extend=tuple(extend),
                         batch_size=batch_size, limit=limit, seed=seed, pack=pack, console=console)
    console.print(f"{result.written} conversations written ({result.skipped} already there), {result.new_tokens} tokens "
                  f"in {result.seconds:.0f} s ({result.tokens_per_second:.1f} tok/s), {result.truncated} answers cut at the limit, "
                  f"{result.near_benchmark} prompts dropped as close to a benchmark question")
    if pack:
        _print_pack(pack, len(result.sealed))
    typer.echo(str(result.out))


def _generating_model(model: str, device: str, dtype: str, trust_remote_code: bool):
    """The model that writes training data; `--dtype auto` on a CPU measures bf16 against fp32 (train/generate.py)."""
    from medusa_bench.models import load_model
    from medusa_bench.train.generate import generation_dtype

    loaded = load_model(model, device, dtype, trust_remote_code)
    if dtype != "auto":
        return loaded
    loaded, choice = generation_dtype(loaded)
    console.print(f"generating in {choice['dtype']}: {choice['reason']}" + (f" {choice['step_ms']} ms" if "step_ms" in choice else ""))
    return loaded


# ------------------------------------------------------------------------- distillation packs
pack_app = typer.Typer(help="Distillation packs: distilled conversations as sealed, compressed parts that outlive the machine.", no_args_is_help=True)
app.add_typer(pack_app, name="pack")


@pack_app.command("seal")
def pack_seal(
    out: Path = typer.Option(..., "--out", "-o", help="The jsonl `distill --out` wrote."),
    pack: Path = typer.Option(..., "--pack", help="The pack folder (e.g. data/distill/smollm2-135m)."),
    final: bool = typer.Option(False, "--final", help="Also seal the last, partial part (when distilling is done)."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Whose answers: hub id, local folder, .gguf file or 'smollm2-135m'."),
) -> None:
    """Seal --out's conversations the pack lacks into new parts (sealed parts are never rewritten)."""
    from transformers import AutoTokenizer

    from medusa_bench.models import resolve_source
    from medusa_bench.train.distill import seal_pack

    source, name = resolve_source(model)
    new = seal_pack(AutoTokenizer.from_pretrained(source), out, pack, name, model, final=final)
    _print_pack(pack, len(new))
    typer.echo(str(pack))


@pack_app.command("info")
def pack_info(pack: Path = typer.Argument(..., exists=True, file_okay=False, help="A pack folder.")) -> None:
    """Conversations, answer tokens, parts and bytes on disk of a pack."""
    _print_pack(pack, None)


def _print_pack(pack: Path, sealed: Optional[int]) -> None:
    from medusa_bench.train.pack import pack_info as info

    tally = info(pack)
    now = f"{sealed} parts sealed now; " if sealed is not None else ""
    console.print(f"{now}{pack}: {tally['conversations']} conversations of {tally['model']}, {tally['answer_tokens']} answer tokens, "
                  f"{tally['parts']} parts, {tally['bytes']} bytes ({tally['bytes'] / 1e6:.2f} MB)")


@datastore_app.command("build")
def datastore_build(
    source: Path = typer.Option(..., "--from", help="Corpus: ShareGPT jsonl (its assistant answers, e.g. `distill`'s output) or plain text; never benchmark questions."),
    out: Path = typer.Option(..., "--out", "-o", help="The datastore file the rest decoder reads (--rest-datastore)."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Whose tokenizer: hub id, local folder, .gguf file or 'smollm2-135m'."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow tokenizer code from the hub (off by default)."),
) -> None:
    """Tokenize a corpus with the model's tokenizer and index it for the `rest` decoder."""
    from transformers import AutoTokenizer

    from medusa_bench.decoders.rest import build_datastore
    from medusa_bench.models import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source(model)[0], trust_remote_code=trust_remote_code)
    store = build_datastore(tokenizer, source, out)
    console.print(f"{len(store.tokens)} tokens indexed")
    typer.echo(str(out))


@app.command()
def instructions(
    seeds: List[Path] = typer.Option(..., "--seeds", help="Seed tasks: self_instruct jsonl files (repeat the option)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output self_instruct-style jsonl (appended; re-run to resume)."),
    count: int = typer.Option(..., "--count", "-n", help="How many new instructions the file should hold."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Hub id, local folder, .gguf file or 'smollm2-135m'."),
    batch_size: int = typer.Option(32, "--batch-size"),
    temperature: float = typer.Option(0.9, "--temperature"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", "--dtype", callback=canonical_dtype, help="auto | float32 | float16 | bfloat16 (or fp32, fp16, bf16)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
) -> None:
    """New training instructions written by the model from seed tasks (self-instruct bootstrapping), for `distill`."""
    from medusa_bench.models import load_model
    from medusa_bench.train.instructions import bootstrap_instructions, check_count

    check_count(count)
    loaded = load_model(model, device, dtype, trust_remote_code)
    tally = bootstrap_instructions(loaded, seeds, count, out, batch_size=batch_size, temperature=temperature, seed=seed,
                                   console=console)
    console.print(f"{out} holds {tally['total']}; kept {tally['kept']} of {tally['generated']} written; dropped: {tally['near_copy']} near-copies, "
                  f"{tally['bad_length']} too short or long, {tally['benchmark_overlap']} close to a benchmark question")
    if tally["total"] < count:
        console.print(f"[yellow]stopped short of {count}: this model keeps too few of the tasks it writes; "
                      "pass more --seeds or a larger model[/yellow]")
    typer.echo(str(out))


heads_app = typer.Typer(help="Heads folders: storage.", no_args_is_help=True)
app.add_typer(heads_app, name="heads")


@heads_app.command("compress")
def heads_compress(folders: List[Path] = typer.Argument(..., exists=True, file_okay=False, help="Heads folders, rewritten in place.")) -> None:
    """Store heads' weight matrices as int8 with a scale per row (half of 16-bit; every loader reads it back)."""
    from medusa_bench.heads.io import compress_folder

    for folder in folders:
        before = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        rewritten = compress_folder(folder)
        after = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        names = ", ".join(f.name for f in rewritten) or "nothing to rewrite"
        console.print(f"{folder}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB ({names})")


_DATA = typer.Option(..., "--data", help="ShareGPT jsonl (e.g. from `medusa-bench distill`).")
_OUT = typer.Option(..., "--out", "-o", help="Output folder for the heads.")
_MODEL = typer.Option("smollm2-135m", "--model", "-m", help="Hub id, local folder, .gguf file or 'smollm2-135m'.")
_HEADS = typer.Option(4, "--heads", help="Number of Medusa heads.")
_HELDOUT = typer.Option(0.05, "--heldout", help="Fraction of sequences held out for accuracy and early stopping.")
_MAX_MINUTES = typer.Option(None, "--max-minutes", help="Optional safety cap: stop optimising after this many minutes (keeps the best weights).")
_MAX_LENGTH = typer.Option(None, "--max-length", help="Truncate sequences to N tokens (default: the model's context).")
_SOFTMAX = typer.Option("active", "--softmax", help="active (training softmax over the tokens seen as targets: faster) | full.")
_SAVE_DTYPE = typer.Option("bfloat16", "--save-dtype", help="float32 | float16 | bfloat16 | int8 (matrices with a scale per row) for the written weights (loading upcasts).")
_HIDDEN_CACHE = typer.Option(None, "--hidden-cache", help="Folder for cached base hidden states (default: user cache; 'none': off).")
_LAYERS = typer.Option(1, "--layers", help="ResBlocks per head.")
_LM_HEAD = typer.Option("shared", "--lm-head", help="shared (heads end in the base lm_head: a few MB) | own.")
_EPOCHS = typer.Option(50, "--epochs", help="The most epochs: held-out accuracy converging normally stops training first.")
_LR = typer.Option(1e-3, "--lr")
_PATIENCE = typer.Option(3, "--patience", help="Held-out evaluations without a top-1 gain above --min-delta: a plateau (the learning rate drops; the third plateau stops training).")
_EVAL_EVERY = typer.Option(None, "--eval-every", help="Optimiser steps between held-out evaluations (default: sized so evaluations take ~10% of the time).")
_MIN_DELTA = typer.Option(0.001, "--min-delta", help="The smallest gain in mean held-out top-1 that counts as progress.")
_SEED = typer.Option(0, "--seed")
_DEVICE = typer.Option("auto", "--device")
_DTYPE = typer.Option("auto", "--dtype", callback=canonical_dtype, help="auto | float32 | float16 | bfloat16 (or fp32, fp16, bf16)")


def _train(fit, config, model: str, device: str, dtype: str, data: Path, out: Path) -> None:
    """What every `train` command does once its options are a config: check, load, fit, say where."""
    from medusa_bench.models import load_model

    config.check()
    result = fit(load_model(model, device, dtype), data, out, config, console=console)
    console.print(f"held-out: {result.best}")
    typer.echo(str(result.out))


@train_app.command("medusa")
def train_medusa(
    data: Path = _DATA, out: Path = _OUT, model: str = _MODEL, heads: int = _HEADS,
    layers: int = _LAYERS, lm_head: str = _LM_HEAD,
    epochs: int = _EPOCHS, batch_size: int = typer.Option(256, "--batch-size", help="Positions per step."),
    lr: float = _LR, heldout: float = _HELDOUT, patience: int = _PATIENCE, eval_every: Optional[int] = _EVAL_EVERY, min_delta: float = _MIN_DELTA,
    max_minutes: Optional[float] = _MAX_MINUTES, max_length: Optional[int] = _MAX_LENGTH, softmax: str = _SOFTMAX,
    save_dtype: str = _SAVE_DTYPE, seed: int = _SEED, hidden_cache: Optional[str] = _HIDDEN_CACHE,
    device: str = _DEVICE, dtype: str = _DTYPE,
) -> None:
    """Medusa-1: train heads on a frozen base model (loss on assistant tokens; held-out accuracy; calibration.json)."""
    from medusa_bench.train.fit import FitConfig, train_medusa as fit

    config = FitConfig(num_heads=heads, num_layers=layers, lm_head=lm_head, epochs=epochs, batch_size=batch_size, lr=lr,
                       heldout=heldout, patience=patience, eval_every=eval_every, min_delta=min_delta, max_minutes=max_minutes, max_length=max_length, softmax=softmax,
                       save_dtype=save_dtype, seed=seed, hidden_cache=hidden_cache)
    _train(fit, config, model, device, dtype, data, out)


@train_app.command("medusa2")
def train_medusa2(
    data: Path = _DATA, out: Path = _OUT, model: str = _MODEL, heads: int = _HEADS,
    init_heads: Optional[str] = typer.Option(None, "--init-heads", help="Start from these Medusa-1 heads (else warm up first)."),
    warmup_epochs: int = typer.Option(2, "--warmup-epochs", help="Medusa-1 epochs before joint training (without --init-heads)."),
    epochs: int = typer.Option(10, "--epochs", help="The most joint epochs: held-out head accuracy converging normally stops first."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per step."),
    lr: float = typer.Option(2e-4, "--lr", help="LoRA learning rate."), heads_lr: float = typer.Option(5e-4, "--heads-lr"),
    lora_r: int = typer.Option(8, "--lora-r"), lora_alpha: int = typer.Option(16, "--lora-alpha"),
    lora_layers: int = typer.Option(0, "--lora-layers", help="Adapt only the last N decoder layers (0: all)."),
    heads_coefficient: float = typer.Option(0.2, "--heads-coefficient", help="lambda: weight of the head losses."),
    heads_decay: float = typer.Option(0.8, "--heads-decay", help="Head k's loss weight is lambda * decay^k."),
    heldout: float = _HELDOUT, patience: int = _PATIENCE, eval_every: Optional[int] = _EVAL_EVERY, min_delta: float = _MIN_DELTA, max_minutes: Optional[float] = _MAX_MINUTES,
    max_length: Optional[int] = _MAX_LENGTH, softmax: str = _SOFTMAX, save_dtype: str = _SAVE_DTYPE,
    full_model: bool = typer.Option(False, "--full-model", help="Write a full merged model folder instead of the compact adapter."),
    seed: int = _SEED, hidden_cache: Optional[str] = _HIDDEN_CACHE,
    device: str = _DEVICE, dtype: str = _DTYPE,
) -> None:
    """Medusa-2: LoRA on the backbone + heads, KL self-distillation to the frozen model; the medusa2 decoder loads the folder."""
    from medusa_bench.train.medusa2 import Medusa2Config, train_medusa2 as fit

    config = Medusa2Config(num_heads=heads, init_heads=init_heads, warmup_epochs=warmup_epochs, epochs=epochs,
                           batch_size=batch_size, lr=lr, heads_lr=heads_lr, lora_r=lora_r, lora_alpha=lora_alpha,
                           lora_layers=lora_layers, heads_coefficient=heads_coefficient, heads_decay=heads_decay,
                           heldout=heldout, patience=patience, eval_every=eval_every, min_delta=min_delta, max_minutes=max_minutes, max_length=max_length,
                           softmax=softmax, save_dtype=save_dtype, full_model=full_model, seed=seed, hidden_cache=hidden_cache)
    _train(fit, config, model, device, dtype, data, out)


# -------------------------------------------------------------------------------- train hydra
@train_app.command("hydra")
def train_hydra(
    data: Path = _DATA, out: Path = _OUT, model: str = _MODEL,
    heads: int = typer.Option(4, "--heads", help="Number of Hydra heads (tree depth)."),
    arch: str = typer.Option("mlp", "--arch", help="mlp (Hydra) | prefix-mlp (Hydra++: one prefix attention layer)."),
    loss: str = typer.Option("teacher", "--loss", help="teacher (the base model's distribution: Hydra++) | data (the data tokens) | both."),
    layers: int = _LAYERS, lm_head: str = _LM_HEAD,
    epochs: int = _EPOCHS, batch_size: int = typer.Option(256, "--batch-size", help="Assistant tokens per step (whole sequences)."),
    lr: float = _LR, heldout: float = _HELDOUT, patience: int = _PATIENCE, eval_every: Optional[int] = _EVAL_EVERY, min_delta: float = _MIN_DELTA,
    max_minutes: Optional[float] = _MAX_MINUTES, max_length: Optional[int] = _MAX_LENGTH, softmax: str = _SOFTMAX,
    save_dtype: str = _SAVE_DTYPE, seed: int = _SEED, hidden_cache: Optional[str] = _HIDDEN_CACHE,
    device: str = _DEVICE, dtype: str = _DTYPE,
) -> None:
    """Hydra: heads conditioned on the drafted tokens above them, on a frozen base model (held-out accuracy; calibration.json)."""
    from medusa_bench.train.hydra import HydraFitConfig, train_hydra as fit

    config = HydraFitConfig(num_heads=heads, num_layers=layers, arch=arch, loss=loss, lm_head=lm_head, epochs=epochs,
                            batch_size=batch_size, lr=lr, heldout=heldout, patience=patience, eval_every=eval_every, min_delta=min_delta, max_minutes=max_minutes,
                            max_length=max_length, softmax=softmax, save_dtype=save_dtype, seed=seed, hidden_cache=hidden_cache)
    _train(fit, config, model, device, dtype, data, out)


# -------------------------------------------------------------------------------- train eagle
@train_app.command("eagle")
def train_eagle(
    data: Path = _DATA, out: Path = _OUT, model: str = _MODEL,
    eagle3: bool = typer.Option(False, "--eagle3", help="EAGLE-3 heads: three fused feature layers, their own draft vocabulary, training-time test."),
    ttt_steps: int = typer.Option(0, "--ttt-steps", help="Depths the draft is unrolled to per example (0: the paper's: 1 for EAGLE-1/2, 3 for EAGLE-3)."),
    noise: Optional[float] = typer.Option(None, "--noise", help="Uniform noise width on input features (default: 0.2 for EAGLE-1/2, 0 for EAGLE-3)."),
    draft_vocab: int = typer.Option(4096, "--draft-vocab", help="EAGLE-3: size of the heads' own vocabulary (most frequent answer tokens)."),
    depth: int = typer.Option(5, "--depth", help="Depths held-out accuracy and calibration.json cover."),
    epochs: int = _EPOCHS, batch_size: int = typer.Option(256, "--batch-size", help="Assistant tokens per step (whole sequences)."),
    lr: float = typer.Option(5e-4, "--lr"), heldout: float = _HELDOUT, patience: int = _PATIENCE, eval_every: Optional[int] = _EVAL_EVERY, min_delta: float = _MIN_DELTA,
    max_minutes: Optional[float] = _MAX_MINUTES, max_length: Optional[int] = _MAX_LENGTH, softmax: str = _SOFTMAX,
    save_dtype: str = _SAVE_DTYPE, seed: int = _SEED, hidden_cache: Optional[str] = _HIDDEN_CACHE,
    device: str = _DEVICE, dtype: str = _DTYPE,
) -> None:
    """EAGLE-1/2 (or --eagle3): a one-layer draft model over the base model's features, on a frozen base (held-out accuracy per depth; calibration.json)."""
    from medusa_bench.train.eagle import EagleFitConfig, train_eagle as fit

    config = EagleFitConfig(variant="eagle3" if eagle3 else "eagle", num_heads=depth, ttt_steps=ttt_steps, noise=noise,
                            draft_vocab=draft_vocab, epochs=epochs, batch_size=batch_size, lr=lr, heldout=heldout,
                            patience=patience, eval_every=eval_every, min_delta=min_delta, max_minutes=max_minutes, max_length=max_length, softmax=softmax,
                            save_dtype=save_dtype, seed=seed, hidden_cache=hidden_cache)
    _train(fit, config, model, device, dtype, data, out)
