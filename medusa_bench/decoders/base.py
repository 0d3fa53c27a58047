"""The decoder interface, its options, and the registry of decoder names.

A decoder turns prompt token ids into answer token ids and reports how it got there (steps,
tokens per step, wall time). Every decoder here is the one speculative loop in `spec.py` with
a different proposer: the baseline proposes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

from medusa_bench.decoders.options import DecoderOptions  # noqa: F401 (re-exported: callers import it from here)
from medusa_bench.errors import UserError, unknown_name


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_p and seed apply only when sampling."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """One answer: tokens cut at EOS (inclusive) and at the limit, and how they were made."""

    token_ids: list[int]
    steps: int  # decoding iterations after prefill (each emits >= 1 token)
    accept_lengths: list[int]  # tokens emitted per step; sums to len(token_ids)
    wall_time: float  # prefill + decode, seconds, device-synchronised
    finish_reason: str  # "stop" (EOS or on_step asked) | "length"
    logprobs: Optional[list] = None  # per token: (logprob, [(token_id, logprob), ...])
    drafts: int = 0  # steps that verified a draft (the last step and no-match steps verify none)
    draft_tokens: int = 0  # draft nodes those steps verified, the root not counted


StepCallback = Callable[[list[int]], Optional[bool]]


class Decoder(Protocol):
    name: str
    lossless: bool  # greedy output must equal the baseline's
    draft_size: int  # nodes drafted per step beyond the root (0 for the baseline)

    def generate(self, prompt_ids: list[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 on_step: Optional[StepCallback] = None, logprobs: Optional[int] = None) -> Generation: ...


# name -> factory(loaded_model, options) -> Decoder. Factories import lazily so that
# `medusa-bench --help` stays fast and a missing optional part only fails when used.
DecoderFactory = Callable[["LoadedModel", DecoderOptions], Decoder]  # noqa: F821
_REGISTRY: dict[str, DecoderFactory] = {}
_HEADS: dict[str, tuple[str, str]] = {}  # name -> (the option naming its heads, the shipped heads' kind)


def register(name: str, heads: Optional[tuple[str, str]] = None):
    """Register a decoder factory; `heads=(option, kind)` when it loads heads: the option naming their
    folder, else the shipped `<model>-<kind>` folder (run.json hashes that folder; a resume checks it)."""
    def wrap(factory: DecoderFactory) -> DecoderFactory:
        _REGISTRY[name] = factory
        if heads is not None:
            _HEADS[name] = heads
        return factory

    return wrap


def heads_option(name: str) -> tuple[Optional[str], Optional[str]]:
    """(option, shipped kind) of a decoder that loads heads, else (None, None)."""
    load_decoders()
    return _HEADS.get(name, (None, None))


def decoder_names() -> list[str]:
    load_decoders()
    return sorted(_REGISTRY)


def split_spec(spec: str) -> tuple[str, Optional[str]]:
    """'medusa:chain-2' → ('medusa', 'chain-2'): one run can compare trees side by side."""
    name, _, tree = spec.partition(":")
    return name.strip(), (tree.strip() or None)


def build_decoder(spec: str, loaded, options: Optional[DecoderOptions] = None) -> Decoder:
    """The registry: 'unknown decoder 'x'; valid names are …' for a typo.

    `spec` is a decoder name, optionally with its own tree after a colon (`medusa:chain-2`),
    which overrides `options.tree` for that decoder only; the decoder is then named `spec`.
    """
    load_decoders()
    name, tree = split_spec(spec)
    if name not in _REGISTRY:
        raise unknown_name("decoder", name, _REGISTRY)
    options = options if options is not None else DecoderOptions()
    if tree is not None:
        options = options.replace(tree=tree)
    decoder = _REGISTRY[name](loaded, options)
    if tree is not None:
        decoder.name = f"{name}:{tree}"
    return decoder


ENTRY_POINTS = "medusa_bench.decoders"  # another package adds decoders here: name = "module"
_LOADED = False


def load_decoders() -> None:
    """Import every module of this package and every entry point in ENTRY_POINTS: importing a
    decoder module registers its decoders (`register`) and declares its options (options.declare)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True  # before importing: a module that asks for the registry while loading sees it partial, not a loop
    import importlib
    import pkgutil
    from importlib.metadata import entry_points

    import medusa_bench.decoders as package

    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")
    for entry in entry_points(group=ENTRY_POINTS):
        entry.load()
