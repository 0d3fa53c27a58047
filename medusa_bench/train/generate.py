"""Batched generation with transformers' `generate`: how the base model writes training data
(`distill`'s answers, `instructions`' tasks and follow-up questions)."""

from __future__ import annotations

import torch


@torch.inference_mode()
def generate_batch(loaded, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float) -> list[tuple[list[int], str]]:
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
