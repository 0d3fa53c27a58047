"""The A/A control: the baseline's exact work under another name, timed like any decoder.

Its speedup over the baseline should be 1.00× and its exact match 100% (fp32); how far a run's
control strays from that is the run's noise floor (timing drift, contention, precision). The
report treats the decoder named `control` that way.
"""

from medusa_bench.decoders.registry import register
from medusa_bench.decoders.spec import Proposer, SpeculativeDecoder


@register("control")
def build_control(loaded, options):
    return SpeculativeDecoder("control", loaded, Proposer())  # lossless; baseline_name "baseline"
