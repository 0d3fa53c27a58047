"""Plain decoding of several requests at once, for `serve` with a non-drafting decoder.

Prompts are left-padded to one length and prefilled in one forward; then every step runs one
forward over one new token per request (same-length steps), each request sampling with its own
temperature, top-p and seed. A request that ends (EOS, its token limit, a stop string, its
client leaving) is dropped from the batch, cache rows included, so the others go on without it.
Numbers may differ in the last bits from one request decoded alone (other matmul shapes), so
the engine decodes a lone request on the decoder's own path.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch
from transformers import DynamicCache

from medusa_bench.decoders.base import Generation, Sampling
from medusa_bench.decoders.acceptance import choose_token
from medusa_bench.decoders.spec import _logprobs
from medusa_bench.runtime.forward import sync
from medusa_bench.models import cache_kwargs


@torch.inference_mode()
def generate_batch(loaded, prompts: list[list[int]], max_new_tokens: list[int], samplings: list[Sampling],
                   on_steps: list[Optional[Callable[[list[int]], Optional[bool]]]],
                   logprobs: list[Optional[int]]) -> list[Generation]:
    """One Generation per prompt (steps = tokens: one token per step, as the baseline's)."""
    model, device = loaded.model, loaded.device
    eos = set(loaded.eos_token_ids)
    n, width = len(prompts), max(len(p) for p in prompts)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = []
    for sampling in samplings:
        generator = None
        if not sampling.greedy:
            generator = torch.Generator(device=device)
            generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        generators.append(generator)

    sync(device)
    start = time.perf_counter()
    cache = DynamicCache()
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(model, cache),
                   use_cache=True, logits_to_keep=1).logits[:, -1]  # [n, V]
    positions = positions[:, -1:]
    out: list[list[int]] = [[] for _ in range(n)]
    token_logprobs: list = [[] if k is not None else None for k in logprobs]
    finish, wall = ["length"] * n, [0.0] * n
    active = list(range(n))  # request index of each batch row
    while active:
        next_tokens, still = [], []
        for row, request in enumerate(active):
            token = choose_token(logits[row], samplings[request], generators[request])
            out[request].append(token)
            if token_logprobs[request] is not None:
                token_logprobs[request].extend(_logprobs([logits[row]], [token], logprobs[request]))
            ended = token in eos
            if ended:
                finish[request] = "stop"
            callback = on_steps[request]
            if callback is not None and callback([token]):
                finish[request], ended = "stop", True
            if ended or len(out[request]) >= max_new_tokens[request]:
                sync(device)
                wall[request] = time.perf_counter() - start
                continue
            still.append(row)
            next_tokens.append(token)
        if not still:
            break
        if len(still) < len(active):  # drop the finished rows, their cache included
            keep = torch.tensor(still, device=device)
            cache.batch_select_indices(keep)
            mask, positions = mask[keep], positions[keep]
            active = [active[row] for row in still]
        mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=1)
        positions = positions + 1
        tokens = torch.tensor(next_tokens, device=device)[:, None]
        logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, **cache_kwargs(model, cache),
                       use_cache=True).logits[:, -1]
    return [Generation(out[i], len(out[i]), [1] * len(out[i]), wall[i], finish[i], token_logprobs[i]) for i in range(n)]
