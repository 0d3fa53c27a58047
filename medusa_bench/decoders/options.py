"""Decoder options, declared once next to the code that reads them.

A decoder module calls `declare(Option(...), ...)` at import. Everything else is derived from
the declarations: the flags of `run`, `serve` and `tree` (cli/app.py), the settings a run folder
keeps fixed for its life and writes to run.json (bench/loop.py), and the values decoders read
from `DecoderOptions` (`options.pld_tokens`). The loop's own options (tree, acceptance) are
declared here. `DecoderOptions.extra` holds Python-only values: what the bench layer measured
for a decoder (`step_profile`, see decoders/registry.py) and callers' own settings (`autotree`,
`pld_adaptive`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from medusa_bench.decoders.discovery import load_decoders
from medusa_bench.errors import UserError, unknown_name

COMMANDS = ("run", "serve", "tree")  # the commands that build decoders


@dataclass(frozen=True)
class Option:
    name: str  # the attribute, setting key and (with dashes) the flag: pld_tokens -> --pld-tokens
    default: Any
    help: str
    commands: tuple[str, ...] = COMMANDS
    check: Optional[Callable[[Any], Optional[str]]] = None  # an error message for a bad value, else None
    kind: Optional[type] = None  # the flag's type; default: the default's (str when the default is None)
    panel: str = "Trees and drafting"  # the `--help` panel its flag is listed under (cli/app.py)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def annotation(self):
        kind = self.kind or (str if self.default is None else type(self.default))
        return Optional[kind] if self.default is None else kind


_DECLARED: dict[str, Option] = {}


def declare(*options: Option) -> None:
    """Add options (a module may be imported twice: the same declaration again is fine)."""
    for option in options:
        if _DECLARED.get(option.name, option) != option:
            raise ValueError(f"decoder option {option.name!r} is declared twice, differently")
        _DECLARED[option.name] = option


def declared(command: Optional[str] = None) -> list[Option]:
    """Every declared option (of `command`), after discovering the decoder modules."""
    load_decoders()
    return [o for o in _DECLARED.values() if command is None or command in o.commands]


class DecoderOptions:
    """The value of every declared option (its default where not given); `extra` holds Python-only settings.

    Frozen: `options.replace(tree="chain-2")` makes a changed copy.
    """

    __slots__ = ("_values", "extra")

    def __init__(self, extra: Optional[dict] = None, **values):
        options = {o.name: o for o in declared()}
        unknown = sorted(set(values) - set(options))
        if unknown:
            raise TypeError(f"unknown decoder option {', '.join(unknown)}; declared: {', '.join(sorted(options))}")
        merged = {name: values.get(name, option.default) for name, option in options.items()}
        for name, option in options.items():
            problem = option.check(merged[name]) if option.check else None
            if problem:
                raise UserError(f"{option.flag} {problem}")
        object.__setattr__(self, "_values", merged)
        object.__setattr__(self, "extra", dict(extra or {}))

    def __getattr__(self, name: str):
        try:
            return object.__getattribute__(self, "_values")[name]
        except KeyError:
            raise AttributeError(f"no decoder option {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("DecoderOptions is frozen: use options.replace(...)")

    def replace(self, **changes) -> "DecoderOptions":
        extra = changes.pop("extra", self.extra)
        return DecoderOptions(extra=extra, **{**self._values, **changes})

    def as_dict(self) -> dict:
        """{name: value} of every declared option: a run's settings."""
        return dict(self._values)

    def __eq__(self, other) -> bool:
        return isinstance(other, DecoderOptions) and (self._values, self.extra) == (other._values, other.extra)

    def __reduce__(self):
        # Pickled through the constructor (frozen: the default slot-by-slot setattr is refused), so
        # options travel to Ray workers (bench/distributed.py) and are checked again there.
        return (_rebuild_options, (self.extra, self._values))

    def __repr__(self) -> str:
        return "DecoderOptions(" + ", ".join(f"{k}={v!r}" for k, v in self._values.items()) + ")"


def _rebuild_options(extra: dict, values: dict) -> DecoderOptions:
    return DecoderOptions(extra=extra, **values)


def within(low: float, high: float = float("inf"), integer: bool = False) -> Callable[[Any], Optional[str]]:
    """A range check: 'must be an integer from 1 to 64, got 0'."""
    def check(value):
        ok = (isinstance(value, int) if integer else isinstance(value, (int, float))) and low <= value <= high
        what = "an integer" if integer else "a number"
        bounds = f"from {low} to {high}" if high != float("inf") else f">= {low}"
        return None if ok else f"must be {what} {bounds}, got {value!r}"

    return check


ACCEPTANCE_RULES = ("greedy", "typical")


def _acceptance_rule(value) -> None:
    if value not in ACCEPTANCE_RULES:
        raise unknown_name("acceptance rule", value, ACCEPTANCE_RULES)


# The verify loop's options: every drafting decoder reads them.
declare(
    # auto by default: mc_sim_7b_63, the default before, is Medusa's tree for Vicuna-7B; on the 2-core EPYC it ran
    # at 0.42x the baseline (docs/results/cpu-first-heads-history.md), the optimiser's trees at 1.17-1.24x.
    Option("tree", "auto", "Candidate tree: 'auto' (measured for these heads on this machine, then cached), a preset "
           "name like mc_sim_7b_63, a JSON file, or an inline list like [[0],[1],[0,0]].", commands=("run", "serve")),
    Option("acceptance", "greedy", "greedy (lossless) | typical", check=_acceptance_rule),
    Option("posterior_threshold", 0.09, "Typical acceptance epsilon.",
           check=lambda v: None if 0 <= v <= 1 else f"must be in [0, 1], got {v}"),
    Option("posterior_alpha", 0.3, "Typical acceptance delta.", check=lambda v: None if v >= 0 else f"must be >= 0, got {v}"),
)
