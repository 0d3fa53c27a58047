"""The typer app and what every command shares: the sub-apps, the console, `--version`, the
declared decoder options as flags (`DecoderCommand`), the engine options."""

from __future__ import annotations

import functools
import inspect
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="medusa-bench",
    help="Benchmark speculative decoding with draft heads (Medusa, Hydra) on your model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
train_app = typer.Typer(help="Train draft heads on self-distilled data.", no_args_is_help=True)
app.add_typer(train_app, name="train")
datastore_app = typer.Typer(help="REST's retrieval datastore: a corpus's token ids and their suffix array.", no_args_is_help=True)
app.add_typer(datastore_app, name="datastore")
console = Console(stderr=True)
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}  # what people type


def canonical_dtype(name: Optional[str]) -> Optional[str]:
    """`--dtype bf16` → 'bfloat16', the name run.json and every comparison use (a typer callback)."""
    return DTYPE_ALIASES.get(name.strip().lower(), name) if isinstance(name, str) else name


def _version(value: bool) -> None:
    """`--version`: the package version and, in a git checkout, its commit."""
    if not value:
        return
    from medusa_bench import __version__
    from medusa_bench.results.files import git_hash

    commit = git_hash()
    typer.echo(f"medusa-bench {__version__}" + (f" (git {commit})" if commit else ""))
    raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version (and git commit) and exit.")) -> None:
    """Benchmark speculative decoding with draft heads (Medusa, Hydra) on your model."""


class DecoderCommand:
    """A typer command whose flags also hold every declared decoder option (decoders/options.py):
    they reach the function as **decoder_options. The flags are computed when typer builds the
    command, which imports the decoder modules; `main` skips that for commands that decode nothing."""

    wanted = True  # main() sets False for commands other than COMMANDS (their start stays fast)

    def __init__(self, fn, command: str):
        functools.update_wrapper(self, fn)
        self.fn, self.command = fn, command

    def __call__(self, **kwargs):
        return self.fn(**kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        from medusa_bench.decoders.options import declared

        signature = inspect.signature(self.fn, eval_str=True)
        params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        if DecoderCommand.wanted:
            params += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=o.annotation,
                                         default=typer.Option(o.default, o.flag, help=o.help, rich_help_panel=o.panel))
                       for o in declared(self.command)]
        return signature.replace(parameters=params)


def decoder_options(command: str):
    return lambda fn: DecoderCommand(fn, command)


def fill_decoder_names() -> None:
    """The registry's names where the help of a decoding command says {decoders} or {tree_decoders}
    (`main`, for those commands only: their flags import the decoder modules anyway)."""
    from typer.models import OptionInfo

    from medusa_bench.decoders.registry import decoder_names, tree_decoders

    names = {"{decoders}": " | ".join(decoder_names()), "{tree_decoders}": " | ".join(tree_decoders())}

    def fill(text: Optional[str]) -> Optional[str]:
        for placeholder, value in names.items():
            text = text.replace(placeholder, value) if text else text
        return text

    for info in app.registered_commands:
        if isinstance(info.callback, DecoderCommand):
            info.help = fill(info.help)
            for parameter in inspect.signature(info.callback.fn).parameters.values():
                if isinstance(parameter.default, OptionInfo):
                    parameter.default.help = fill(parameter.default.help)


# Engine options, the same for every command that decodes (runtime/engine.py).
def _cache_option(panel: Optional[str] = None):
    return typer.Option("auto", "--cache", help="KV cache: auto (static where the model allows it) | static | dynamic.",
                        rich_help_panel=panel)


def _compile_option(panel: Optional[str] = None):
    return typer.Option("auto", "--compile", rich_help_panel=panel,
                        help="Captured steps: auto (CUDA graphs on CUDA, eager on CPU) | on (CUDA graphs; on CPU torch.compile) | off. "
                             "The baseline and every decoder share it.")


_CACHE, _COMPILE = _cache_option(), _compile_option()
