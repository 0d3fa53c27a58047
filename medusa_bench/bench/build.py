"""Building decoders on a loaded model, for `run`, `serve` and Python callers: what the options
leave open is measured here, then the registry (decoders/registry.py) builds from concrete values.

- `--tree auto` (the default of every decoder that drafts on a tree, `registry.tree_decoders()`):
  the optimiser sizes a tree for the decoder's own heads (bench/autotree.size_tree), the registry
  builds the decoder on it, and `decoder.autotree` keeps the search for the run folder.
- A step-time profile for decoders that decide by one (`register(..., step_profile=...)`: prompt
  lookup), measured once per model, device, dtype and code and cached beside the tree tables
  (bench/tree_cache.cached_step_profile), given as `options.extra["step_profile"]`.
- `pld:auto`: prompt lookup's knobs searched on the calibration answers with that profile
  (bench/pld_search.py); `decoder.knob_search` keeps the search for the run folder (pld-search.json).

A `plan` gives these instead of measuring them: `{"trees": {spec: {"auto": True, "paths": [...]}},
"profiles": {spec: profile}, "searches": {spec: pld-search.json's record}}`, the shape of run.json's
`device_plans`: a Ray worker builds its device type's plan (bench/distributed.py), a resumed run its
own profiles and searches (autotree.saved_profiles, pld_search.saved_searches).
"""

from __future__ import annotations

from typing import Optional

from medusa_bench.bench.autotree import settings_of, size_tree
from medusa_bench.bench.tree_cache import cached_step_profile
from medusa_bench.decoders import registry
from medusa_bench.decoders.base import Decoder
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.trees.tree import Tree


def build_decoders(specs: list[str], loaded, options: Optional[DecoderOptions] = None,
                   plan: Optional[dict] = None) -> dict[str, Decoder]:
    """{spec: decoder} in the given order, all on `loaded` (whose engine they share)."""
    return {spec: build_decoder(spec, loaded, options, plan) for spec in specs}


def build_decoder(spec: str, loaded, options: Optional[DecoderOptions] = None, plan: Optional[dict] = None) -> Decoder:
    """The decoder `spec` names (`medusa`, `medusa:chain-2`, `hydra:auto`), its tree and profile resolved first."""
    plan = plan or {}
    found, options = registry.spec_options(spec, options)
    auto = None
    if found.tree and options.tree == "auto":
        planned = (plan.get("trees") or {}).get(spec) or {}
        if planned.get("auto"):  # the tree this device type's first worker chose
            options = options.replace(tree=Tree(planned["paths"], name=planned.get("name")))  # dynamic knobs: by name
        else:
            auto = size_tree(spec, loaded, options)
            options = options.replace(tree=auto.tree)
    if found.needs_step_profile(options):
        profile = (plan.get("profiles") or {}).get(spec) or cached_step_profile(loaded, settings_of(options))
        options = options.replace(extra={**options.extra, "step_profile": profile})
    search = None
    if options.extra.get(registry.AUTO_KNOBS):  # `pld:auto`: knobs searched on calibration text with that profile, or the plan's
        from medusa_bench.bench.pld_search import choose_knobs

        options, search = choose_knobs(spec, loaded, options, plan)
    decoder = registry.build_decoder(found.name, loaded, options)
    decoder.name = spec
    if auto is not None:
        decoder.autotree = auto  # the run folder keeps the optimiser's files (autotree.store_in_run)
    if search is not None:
        decoder.knob_search = search  # the run folder keeps it as pld-search.json (pld_search.store_searches)
    return decoder


def fastest_prediction(specs: list[str], loaded, options: Optional[DecoderOptions] = None) -> Optional[dict]:
    """The optimiser's fastest predicted way to decode on `loaded` among the decoders of `specs` it
    predicts (`--tree auto` decoders, and `pld:auto` by its knob search): {"decoder" ("baseline" where
    none pays), "nodes", "speedup", "tokens_per_s", "baseline_tokens_per_s"}; None when it predicts
    none of them. Decoders are compared by predicted speedup: each over the same model's one-token step,
    while each table's own tokens/s is as fast as the machine was when it was measured (cached tables
    can be hours old: one machine's baseline moved 18% between two runs 35 minutes apart). `--dtype auto`
    compares the winner across precisions (bench/precision.choose_dtype). The tables, profile and search
    land in their caches, so the run's own build reuses them."""
    rows = []
    for spec in specs:
        found, sized = registry.spec_options(spec, options)
        if found.tree and sized.tree == "auto":
            choice = size_tree(spec, loaded, sized).result.choice
            rows.append({"decoder": spec if choice.n > 1 else "baseline", "nodes": choice.n, "speedup": round(choice.speedup, 3),
                         "tokens_per_s": round(choice.throughput, 2), "baseline_tokens_per_s": round(choice.baseline_throughput, 2)})
        elif sized.extra.get(registry.AUTO_KNOBS):
            rows.append(knob_prediction(spec, loaded, sized))
    return max(rows, key=lambda row: row["speedup"], default=None)


def knob_prediction(spec: str, loaded, options: DecoderOptions) -> dict:
    """`pld:auto`'s prediction as a `fastest_prediction` row: its searched speedup over the one-token
    step of its own step profile (the baseline it predicts against)."""
    from medusa_bench.bench.pld_search import choose_knobs

    profile = cached_step_profile(loaded, settings_of(options))
    _, record = choose_knobs(spec, loaded, options.replace(extra={**options.extra, "step_profile": profile}))
    speedup, baseline = record["predicted"]["speedup"], 1.0 / profile["chain"]["1"]
    return {"decoder": spec if speedup > 1 else "baseline", "nodes": None, "knobs": record["spec"], "speedup": round(speedup, 3),
            "tokens_per_s": round(speedup * baseline, 2), "baseline_tokens_per_s": round(baseline, 2)}


def build_like(spec: str, decoder: Decoder, loaded, options: Optional[DecoderOptions] = None) -> Decoder:
    """Another decoder like `decoder` (built from `spec`): on its tree as it is (no re-sizing) and with
    its step profile (no re-measuring): one per row of a batch (decoders/batched.py)."""
    plan: dict = {}
    tree = getattr(getattr(decoder, "proposer", None), "tree", None)
    if isinstance(tree, Tree):
        plan["trees"] = {spec: {"auto": True, "paths": tree.to_list()}}
    if getattr(decoder, "step_profile", None) is not None:
        plan["profiles"] = {spec: decoder.step_profile}
    return build_decoder(spec, loaded, options, plan)
