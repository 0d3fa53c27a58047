"""The baseline decoder: same tokens as model.generate, EOS/limit cuts, sampling, logprobs."""

import torch

from medusa_bench.inputs.chat import build_prompt
from medusa_bench.decoders.base import Sampling
from medusa_bench.decoders.registry import build_decoder


def prompt(smollm, text="Name three colours."):
    return build_prompt(smollm, [{"role": "user", "content": text}])


def test_greedy_matches_generate(smollm):
    decoder = build_decoder("baseline", smollm)
    ids = prompt(smollm, "Explain why the sky is blue.")
    ours = decoder.generate(ids, 24)
    with torch.inference_mode():
        ref = smollm.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    eos = set(smollm.eos_token_ids)
    cut = next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))
    assert ours.token_ids == ref[:cut]
    assert ours.steps == len(ours.token_ids) == sum(ours.accept_lengths)
    assert all(a == 1 for a in ours.accept_lengths)
    assert ours.wall_time > 0


def test_stops_at_eos_inclusive(smollm):
    decoder = build_decoder("baseline", smollm)
    result = decoder.generate(prompt(smollm, "Reply with just the word yes."), 64)
    assert result.finish_reason == "stop"
    assert result.token_ids[-1] in smollm.eos_token_ids
    assert len(result.token_ids) < 64


def test_limit_and_sampling_seed(smollm):
    decoder = build_decoder("baseline", smollm)
    ids = prompt(smollm, "Write a poem about the sea.")
    a = decoder.generate(ids, 10, Sampling(temperature=0.9, top_p=0.9, seed=7))
    b = decoder.generate(ids, 10, Sampling(temperature=0.9, top_p=0.9, seed=7))
    assert a.token_ids == b.token_ids and len(a.token_ids) == 10 and a.finish_reason == "length"


def test_logprobs_and_early_stop(smollm):
    decoder = build_decoder("baseline", smollm)
    seen = []
    result = decoder.generate(prompt(smollm), 20, on_step=lambda toks: seen.extend(toks) or len(seen) >= 3, logprobs=2)
    assert result.token_ids == seen[:3] and result.finish_reason == "stop"
    logprob, top = result.logprobs[0]
    assert logprob <= 0 and len(top) == 2 and top[0][0] == result.token_ids[0]
