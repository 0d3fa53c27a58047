"""How distillation generates (train/generate.py): greedy answers streamed through the batched
baseline equal transformers' `generate`, and `--dtype auto` keeps fp32 without native bf16."""

from __future__ import annotations

import torch

from medusa_bench.inputs.chat import build_prompt
from medusa_bench.train import generate

QUESTIONS = ["Name a colour.", "Write one sentence about rivers.", "What is 3 + 4?", "Say hello in French."]


def test_streamed_greedy_answers_equal_generate(smollm, monkeypatch):
    """Four prompts through two slots (rows leave and newcomers join); EOS is cut as generate() cuts it."""
    monkeypatch.setattr(generate, "SLOTS", 2)
    ids = [build_prompt(smollm, [{"role": "user", "content": q}]) for q in QUESTIONS]
    streamed = generate.generate_batch(smollm, ids, 24, 0.0, 1.0)
    alone = [generate.transformers_generate(smollm, [x], 24, 0.0, 1.0)[0] for x in ids]
    assert streamed == alone
    assert {reason for _, reason in streamed} <= {"stop", "length"}
    assert all(not tokens or tokens[-1] not in smollm.eos_token_ids for tokens, _ in streamed)


def test_dtype_auto_keeps_fp32_without_native_bf16_and_times_it_with(smollm):
    same, choice = generate.generation_dtype(smollm, flags={"avx2", "fma"})
    assert same is smollm and choice["dtype"] == "float32" and "no native bf16" in choice["reason"]
    chosen, timed = generate.generation_dtype(smollm, flags={"avx2", "avx512_bf16"})  # as on the AVX-512 EPYC: timed
    assert set(timed["step_ms"]) == {"float32", "bfloat16"} and timed["dtype"] == min(timed["step_ms"], key=timed["step_ms"].get)
    assert chosen.dtype == getattr(torch, timed["dtype"]) and smollm.dtype == torch.float32
