"""The baseline: the shared loop with an empty tree, i.e. plain greedy or sampled decoding."""

from medusa_bench.decoders.registry import register
from medusa_bench.decoders.spec import Proposer, SpeculativeDecoder


@register("baseline")
def build_baseline(loaded, options):
    return SpeculativeDecoder("baseline", loaded, Proposer())
