"""The registry of decoder names: each name's factory, and what the factory reads besides the model.

A decoder module registers its factories when imported (`discovery.py` imports them all):

    @register("medusa", heads=("medusa_heads", "medusa"), tree=True)
    def build_medusa(loaded, options: DecoderOptions) -> Decoder: ...

`build_decoder(spec, loaded, options)` finds the factory, builds, and then sets the acceptance
rule the options ask for (`--acceptance`, its thresholds) on every `SpeculativeDecoder`, so no
factory builds one. A factory gets concrete values only: with `tree=True`, `options.tree` is a
`Tree` (never 'auto'); with `step_profile`, `options.extra["step_profile"]` is a measured profile
or None; with `knobs`, its options as the spec set them (`pld:tokens5`), never 'auto'. The bench
layer measures what 'auto' and the profile leave open (bench/build.py) and then calls here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Union

from medusa_bench.decoders.acceptance import Acceptance
from medusa_bench.decoders.base import Decoder
from medusa_bench.decoders.discovery import load_decoders
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.decoders.spec import SpeculativeDecoder
from medusa_bench.errors import UserError, unknown_name
from medusa_bench.trees.dynamic import DynamicKnobs
from medusa_bench.trees.tree import Tree

DecoderFactory = Callable[["LoadedModel", DecoderOptions], Decoder]  # noqa: F821 (models.LoadedModel)


@dataclass(frozen=True)
class Entry:
    """A registered decoder: its factory and what that factory reads besides the model."""

    name: str
    factory: DecoderFactory
    heads: Optional[tuple[str, str]] = None  # (the option naming its heads folder, the shipped heads' kind)
    tree: bool = False  # drafts on `--tree`: gets a Tree, sets `decoder.sizing` (base.TreeSizing) for 'auto'
    # reads a step-time profile from options.extra["step_profile"]: always (True), or when a test of the options says so
    step_profile: Union[bool, Callable[[DecoderOptions], bool]] = False
    requires: tuple[tuple[str, str], ...] = ()  # (option, how to get it): options it cannot run without
    knobs: Optional["Knobs"] = None  # its spec suffix sets some of its options (`pld:tokens5`), or asks for a search (`pld:auto`)

    def check_required(self, options: DecoderOptions) -> None:
        """One line naming a required option left unset, before any model is loaded or tree sized."""
        for option, how in self.requires:
            if not getattr(options, option):
                raise UserError(f"decoder {self.name!r} needs --{option.replace('_', '-')} PATH; {how}")

    def needs_step_profile(self, options: DecoderOptions) -> bool:
        return self.step_profile(options) if callable(self.step_profile) else self.step_profile


_ENTRIES: dict[str, Entry] = {}

# `pld:full`: a decoder that drafts only what pays by a step profile, drafting every candidate
# instead, as its paper does (the leaderboard's τ); a tree decoder's suffix is its tree.
FULL = "full"


@dataclass(frozen=True)
class DraftsWhatPays:
    """`register(step_profile=DraftsWhatPays("pld"))`: the decoder drafts only the candidates that pay
    by a measured step profile, unless `DecoderOptions(extra={"pld_adaptive": False})` (or the spec
    `pld:full`) asks for every candidate."""

    name: str

    @property
    def key(self) -> str:
        return f"{self.name}_adaptive"

    def __call__(self, options: DecoderOptions) -> bool:
        return options.extra.get(self.key, True)


# `pld:auto`: the decoder's knobs are chosen by the bench layer for this model and machine
# (bench/pld_search.py); the spec marks it so in options.extra, and the registry refuses to build it unresolved.
AUTO = "auto"
AUTO_KNOBS = "auto_knobs"
_KNOB = re.compile(r"([a-z]+)(\d+)")


@dataclass(frozen=True)
class Knobs:
    """`register(knobs=Knobs((("tokens", "pld_tokens"), …), sweep=…))`: the spec suffix `pld:ngram3-tokens10`
    sets those options for that decoder only (any of them, any order); `pld:auto` leaves them to the bench
    layer's search; `pld:sweep` (bench/config.expand_sweep) stands for the decoder at each of `sweep`."""

    words: tuple[tuple[str, str], ...]  # (suffix word, option): 'tokens5' sets pld_tokens = 5
    sweep: tuple[str, ...] = ()  # suffixes `<name>:sweep` stands for; "" is the decoder as its options say

    def form(self, name: str) -> str:
        return f"{name}:" + "-".join(f"{word}N" for word, _ in self.words)

    @staticmethod
    def written(suffix: str) -> bool:
        """Is the suffix written as knobs (`tokens5-ngram2`: words with numbers), whichever words?"""
        return all(_KNOB.fullmatch(part.strip()) for part in suffix.split("-"))

    def parse(self, spec: str, suffix: str, options: DecoderOptions) -> DecoderOptions:
        """The options with the suffix's knobs set (`written` ones); one line naming the valid form for a bad one."""
        name, words, values = split_spec(spec)[0], dict(self.words), {}
        example = f"{name}:{self.words[-1][0]}2" if self.words else name
        form = f"write {self.form(name)} (any of them, e.g. {example}) or {name}:{AUTO}"
        for part in suffix.split("-"):
            word, number = _KNOB.fullmatch(part.strip()).groups()
            option = words.get(word)
            if option is None or option in values:
                raise UserError(f"{spec}: '{part}' is {'set twice' if option else 'no knob of ' + name}; {form}")
            values[option] = int(number)
        try:
            return options.replace(**values)
        except UserError as error:
            raise UserError(f"{spec}: {error}; {form}") from None


def register(name: str, heads: Optional[tuple[str, str]] = None, tree: bool = False,
             step_profile: Union[bool, Callable[[DecoderOptions], bool]] = False,
             requires: tuple[tuple[str, str], ...] = (), knobs: Optional[Knobs] = None):
    """Register a decoder factory under `name`.

    `heads=(option, kind)`: it loads heads, from the folder the option names, else the shipped
    `<model>-<kind>` folder (run.json hashes that folder; a resume checks it; `serve --heads`
    swaps it). `tree`: it drafts on `options.tree`. `step_profile`: it decides by a step-time
    profile the bench layer measures (prompt lookup). `requires=((option, how to get it), ...)`:
    options it cannot run without, checked by `check_required` when a run's options are parsed.
    `knobs`: its spec suffix sets some of its options (`Knobs`), or `:auto` asks the bench layer to choose them.
    """
    def wrap(factory: DecoderFactory) -> DecoderFactory:
        _ENTRIES[name] = Entry(name, factory, heads, tree, step_profile, tuple(requires), knobs)
        return factory

    return wrap


# ------------------------------------------------------------------------------ questions
def entry(name: str) -> Entry:
    """The registered decoder `name`; 'unknown decoder 'x'; valid names are …' for a typo."""
    load_decoders()
    if name not in _ENTRIES:
        raise unknown_name("decoder", name, _ENTRIES)
    return _ENTRIES[name]


def decoder_names() -> list[str]:
    load_decoders()
    return sorted(_ENTRIES)


def tree_decoders() -> list[str]:
    """Decoders that draft on `--tree` (and so can be sized by `--tree auto` and `medusa-bench tree`)."""
    return [name for name in decoder_names() if _ENTRIES[name].tree]


def heads_decoders() -> list[str]:
    """Decoders that load heads (`heads_option` names the option)."""
    return [name for name in decoder_names() if _ENTRIES[name].heads is not None]


def heads_option(name: str) -> tuple[Optional[str], Optional[str]]:
    """(option, shipped kind) of a decoder that loads heads, else (None, None)."""
    return entry(name).heads or (None, None)


def split_spec(spec: str) -> tuple[str, Optional[str]]:
    """'medusa:chain-2' → ('medusa', 'chain-2'): one run can compare trees side by side."""
    name, _, tree = spec.partition(":")
    return name.strip(), (tree.strip() or None)


def spec_options(spec: str, options: Optional[DecoderOptions] = None) -> tuple[Entry, DecoderOptions]:
    """The decoder a spec names, and the options it is built with: the spec's own tree (`medusa:chain-2`)
    overrides `options.tree` for that decoder only; `pld:full` drafts every candidate (DraftsWhatPays);
    `pld:tokens5` sets that knob, `pld:auto` marks the knobs for the bench layer's search (`Knobs`)."""
    name, suffix = split_spec(spec)
    found = entry(name)
    options = options if options is not None else DecoderOptions()
    if suffix is None:
        return found, options
    if found.tree:
        return found, options.replace(tree=suffix)
    if suffix == FULL and isinstance(found.step_profile, DraftsWhatPays):
        return found, options.replace(extra={**options.extra, found.step_profile.key: False})
    if found.knobs is not None and suffix == AUTO:
        return found, options.replace(extra={**options.extra, AUTO_KNOBS: True})
    if found.knobs is not None and found.knobs.written(suffix):
        return found, found.knobs.parse(spec, suffix, options)
    full = [f"{n}:{FULL}" for n, e in sorted(_ENTRIES.items()) if not e.tree and isinstance(e.step_profile, DraftsWhatPays)]
    knobs = [f"{e.knobs.form(n)}, {n}:{AUTO}" for n, e in sorted(_ENTRIES.items()) if e.knobs is not None]
    raise UserError(f"{spec}: {name} drafts on no tree, so ':{suffix}' means nothing to it; name a tree only for "
                    f"{', '.join(tree_decoders())}, ask a step-profile drafter for every candidate: {', '.join(full)}"
                    + (f", or set knobs: {'; '.join(knobs)}" if knobs else ""))


def needs_step_profile(spec: str, options: Optional[DecoderOptions] = None) -> bool:
    """Does the decoder `spec` decide by a step-time profile with these options (the bench layer measures it)?"""
    found, options = spec_options(spec, options)
    return found.needs_step_profile(options)


def check_required(spec: str, options: DecoderOptions) -> None:
    """The decoder `spec` has every option it cannot run without (one line naming the first missing)."""
    found, options = spec_options(spec, options)
    found.check_required(options)


def acceptance_of(options: DecoderOptions) -> Acceptance:
    return Acceptance(options.acceptance, options.posterior_threshold, options.posterior_alpha)


# ------------------------------------------------------------------------------ building
def build_decoder(spec: str, loaded, options: Optional[DecoderOptions] = None) -> Decoder:
    """The decoder `spec` names (`medusa`, or `medusa:chain-2`, then named so) on `loaded`.

    Its tree must be concrete: `--tree auto` is measured on the model by the bench layer
    (bench/build.build_decoder), which then calls this with the tree it chose.
    """
    found, options = spec_options(spec, options)
    if found.tree:
        if isinstance(options.tree, str) and options.tree.strip().lower() == "auto":
            raise UserError(f"decoder {spec!r}: --tree auto is measured on the loaded model by the bench layer "
                            "(medusa_bench.bench.build.build_decoder); here pass a fixed tree, e.g. tree='chain-3'")
        if DynamicKnobs.parse(options.tree) is None:  # a dynamic tree's knobs stay a name: its factory reads them
            options = options.replace(tree=Tree.parse(options.tree))
    if options.extra.get(AUTO_KNOBS):
        raise UserError(f"decoder {spec!r}: ':{AUTO}' knobs are searched on the loaded model by the bench layer "
                        f"(medusa_bench.bench.build.build_decoder); here set them, e.g. {found.knobs.form(found.name) if found.knobs else found.name}")
    decoder = found.factory(loaded, options)
    use_acceptance(decoder, acceptance_of(options), found.name)
    if spec != found.name:
        decoder.name = spec
    if found.tree and not hasattr(decoder, "sizing"):
        raise TypeError(f"decoder {found.name!r} is registered with tree=True: its factory must set decoder.sizing "
                        "(decoders/base.TreeSizing), what --tree auto sizes its trees with")
    return decoder


def use_acceptance(decoder: Decoder, acceptance: Acceptance, name: str) -> None:
    """Every SpeculativeDecoder verifies by the options' rule; another kind of decoder has none to set."""
    if isinstance(decoder, SpeculativeDecoder):
        decoder.acceptance = acceptance
        # typical acceptance keeps what greedy would reject: lossless no more, unless nothing is ever drafted
        decoder.lossless = decoder.lossless and (acceptance.rule == "greedy" or decoder.draft_size == 0)
    elif acceptance.rule != "greedy":
        raise UserError(f"decoder {name!r} does not verify drafts in the shared loop: --acceptance {acceptance.rule} "
                        "cannot apply to it; leave --acceptance greedy")
