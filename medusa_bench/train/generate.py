"""Batched generation: how the base model writes training data (`distill`'s answers,
`instructions`' tasks and follow-up questions).

Greedy answers stream through the run loop's batched baseline (decoders/batched.py) on the static
KV cache: up to `SLOTS` rows decode together, a row that finishes leaves at once and the next
prompts join the running batch (continuous batching), so no row computes padding after its EOS
and the batch stays full until the queue runs dry. Sampled answers (and models the static cache
refuses) go through transformers' `generate`.

Measured on the 2-core Zen 2 EPYC (fp32, 64 GSM8K questions, 128 new tokens): `generate` at
batch 32 110 tok/s, our batched baseline 117 tok/s at 32 rows and 131 at 64 (a step of 64 rows
is 72% matmuls: the cores are saturated), bf16 27.6 tok/s (emulated: no avx512_bf16).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import weakref

import torch

from medusa_bench.models import native_bf16_flag

SLOTS = 64  # rows decoding at once: 131 against 121 tok/s at 32 and 118 at 128 on the Zen 2 EPYC (fp32)
_BASELINES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> one baseline decoder per slot


def generate_batch(loaded, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float) -> list[tuple[list[int], str]]:
    """Per prompt: the new tokens cut at EOS, and 'stop' or 'length'."""
    if temperature <= 0:
        batch = batched_baseline(loaded, len(prompts))
        if batch is not None:
            eos = set(loaded.eos_token_ids)
            return [(_without_eos(g.token_ids, eos), g.finish_reason) for g in batch.generate(prompts, max_new_tokens)]
    return transformers_generate(loaded, prompts, max_new_tokens, temperature, top_p)


def _without_eos(tokens: list[int], eos: set[int]) -> list[int]:
    return list(tokens[:-1]) if tokens and tokens[-1] in eos else list(tokens)


def batched_baseline(loaded, rows: int):
    """The run loop's baseline over min(rows, SLOTS) slots, or None where it cannot batch this model."""
    from medusa_bench.decoders.batched import BatchedDecoder, batch_refusal
    from medusa_bench.decoders.spec import Proposer, SpeculativeDecoder

    built = _BASELINES.setdefault(loaded.model, [])
    while len(built) < min(rows, SLOTS):
        built.append(SpeculativeDecoder("baseline", loaded, Proposer()))
    if batch_refusal(built[0]) is not None:
        return None
    return BatchedDecoder(built[: min(rows, SLOTS)])


@torch.inference_mode()
def transformers_generate(loaded, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                          top_p: float) -> list[tuple[list[int], str]]:
    """Left-padded batched `generate`; per row the new tokens cut at EOS and 'stop' or 'length'."""
    from transformers import GenerationConfig

    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else loaded.eos_token_ids[0]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)  # [B, W]
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [B, W]
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    sampled = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampled, temperature=temperature if sampled else None,
                              top_p=top_p if sampled else None, top_k=None, pad_token_id=pad, eos_token_id=loaded.eos_token_ids)
    output = loaded.model.generate(input_ids=input_ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                                   generation_config=config)  # [B, W + new]
    results = []
    eos = set(loaded.eos_token_ids)
    for row in output[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        results.append((row[:cut], "stop") if cut is not None else (row, "length"))
    return results


# ------------------------------------------------------------------------------ which dtype generates
@torch.inference_mode()
def step_seconds(model, rows: int, runs: int = 5) -> float:
    """Median time of one forward of `rows` one-token rows: a decode step's matmul shapes at SLOTS rows."""
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(rows, device=model.device) * 7919 % (vocab - 100) + 100)[:, None]  # [rows, 1]
    model(input_ids=ids, use_cache=False)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def generation_dtype(loaded, flags: set[str] | None = None) -> tuple[object, dict]:
    """`distill --dtype auto` on a CPU: the fp32 model, or a bf16 copy where bf16 steps at SLOTS rows
    measure faster. Without native bf16 (no avx512_bf16 / amx_bf16) torch emulates it, 4x slower
    here (27.6 against 117 tok/s on the Zen 2 EPYC), so fp32 is kept without timing."""
    if loaded.device.type != "cpu" or loaded.dtype != torch.float32:
        return loaded, {"dtype": str(loaded.dtype).removeprefix("torch."), "reason": "as loaded"}
    flag = native_bf16_flag(flags)
    if flag is None:
        return loaded, {"dtype": "float32", "reason": "no native bf16 on this CPU (avx512_bf16 / amx_bf16)"}
    bf16 = dataclasses.replace(loaded, model=_bf16_copy(loaded.model), dtype=torch.bfloat16)
    times = {"float32": step_seconds(loaded.model, SLOTS), "bfloat16": step_seconds(bf16.model, SLOTS)}
    chosen = min(times, key=times.get)
    choice = {"dtype": chosen, "reason": f"{flag}: a {SLOTS}-row step measured",
              "step_ms": {k: round(v * 1000, 1) for k, v in times.items()}}
    return (bf16 if chosen == "bfloat16" else loaded), choice


def _bf16_copy(model):
    import copy

    return copy.deepcopy(model).to(torch.bfloat16)
