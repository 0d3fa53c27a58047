"""The `medusa-bench` command line: typer wiring only, one thin function per command.

Every command parses its options, calls the package's Python API, and prints. Errors a user
can fix are `UserError`s and print as one line (MEDUSA_BENCH_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from medusa_bench.bench.failed import ANSWERS_MISSING_EXIT
from medusa_bench.errors import UserError

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


def _not_built(what: str) -> None:
    raise UserError(f"`medusa-bench {what}` is not built yet")


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


# ---------------------------------------------------------------------------------------- run
# `run --help` panels (the declared decoder options list under their own Option.panel: "Trees and drafting").
_WHAT, _MODEL, _OUTPUT, _SCALE, _ENDPOINTS = "What to run", "Model", "Output and resume", "Scale-out (Ray)", "Endpoints"

RUN_HELP = f"""Run decoders over a bench's questions; appends answers and resumes where it stopped.

Decoders: {{decoders}}; `medusa:chain-2` gives one decoder its own tree.

τ (tau), in the answers and the report: mean accepted tokens per step, i.e. tokens emitted per forward of the base model (Spec-Bench's 'mean accepted tokens', vLLM's 'mean acceptance length'); the baseline's is 1.00.

Ends by printing the report's at-a-glance table (all tables: `medusa-bench report RUN_DIR --format table`).

Exit codes: 0 done; 2 refused (one line says why; nothing is written); {ANSWERS_MISSING_EXIT} finished, but answers are missing (requests that failed after their retries, listed in failed.jsonl: the same command retries them); 130 interrupted (finished answers are kept).
"""


@app.command(help=RUN_HELP)
@decoder_options("run")
def run(
    decoders: Optional[str] = typer.Option(None, "--decoders", "-d", help="Comma-separated decoder names (default: baseline; with --endpoint: none, the endpoints alone).", rich_help_panel=_WHAT),
    bench: str = typer.Option("mt_bench", "--bench", help="mt_bench | spec_bench | quick", rich_help_panel=_WHAT),
    questions: Optional[Path] = typer.Option(None, "--questions", help="A FastChat question.jsonl (overrides --bench lookup).", rich_help_panel=_WHAT),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N questions.", rich_help_panel=_WHAT),
    question_ids: Optional[str] = typer.Option(None, "--question-ids", help="Comma-separated question ids, e.g. 81,82.", rich_help_panel=_WHAT),
    categories: Optional[str] = typer.Option(None, "--categories", help="Comma-separated categories, e.g. math,coding.", rich_help_panel=_WHAT),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Token limit per turn.", rich_help_panel=_WHAT),
    temperature: str = typer.Option("0", "--temperature", help="A number, or 'category' for FastChat's per-category temperatures.", rich_help_panel=_WHAT),
    top_p: float = typer.Option(1.0, "--top-p", rich_help_panel=_WHAT),
    seed: int = typer.Option(0, "--seed", rich_help_panel=_WHAT),
    warmup: int = typer.Option(1, "--warmup", help="Untimed warm-up generations per decoder.", rich_help_panel=_WHAT),
    control: bool = typer.Option(False, "--control", help="Add the A/A control: the baseline's work timed again as decoder 'control' (the noise floor).", rich_help_panel=_WHAT),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Hub id, local folder, .gguf file or 'smollm2-135m'.", rich_help_panel=_MODEL),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda", rich_help_panel=_MODEL),
    dtype: str = typer.Option("auto", "--dtype", help="auto (CPU: bf16 if it is native and measures faster, else fp32; CUDA: bf16, else fp16) | float32 | float16 | bfloat16", rich_help_panel=_MODEL),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub (off by default).", rich_help_panel=_MODEL),
    precision_reference: str = typer.Option("auto", "--precision-reference", help="float32 | none: decode the baseline again in fp32 (untimed) to show what the precision changes; auto: float32 unless the run is fp32.", rich_help_panel=_MODEL),
    cache: str = _cache_option(_MODEL),
    compile: str = _compile_option(_MODEL),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default results/<model>-<bench>); the same command again resumes it.", rich_help_panel=_OUTPUT),
    remeasure_flagged: bool = typer.Option(False, "--remeasure-flagged", help="Re-time the questions with a turn measured while the CPU was shared; answers are kept.", rich_help_panel=_OUTPUT),
    endpoint: Optional[List[str]] = typer.Option(None, "--endpoint", help="NAME=URL of an OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, `serve`), e.g. ref=http://127.0.0.1:8000/v1; repeatable. Each is a decoder of the run.", rich_help_panel=_ENDPOINTS),
    endpoint_model: Optional[str] = typer.Option(None, "--endpoint-model", help="Model id to ask the endpoints for (default: each server's only model in /v1/models).", rich_help_panel=_ENDPOINTS),
    reference: Optional[str] = typer.Option(None, "--reference", help="The endpoint with speculation off: the baseline for speedup and exact match.", rich_help_panel=_ENDPOINTS),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Environment variable holding the endpoints' API key (never written anywhere).", rich_help_panel=_ENDPOINTS),
    metrics_url: Optional[str] = typer.Option(None, "--metrics-url", help="Prometheus /metrics of the endpoints (default: the host of each URL + /metrics).", rich_help_panel=_ENDPOINTS),
    concurrency: Optional[str] = typer.Option(None, "--concurrency", help="Endpoints: a sweep of requests in flight, e.g. 1,4,16 (appended to sweep.jsonl).", rich_help_panel=_ENDPOINTS),
    request_timeout: float = typer.Option(300.0, "--request-timeout", help="Endpoints: seconds per request before it is retried.", rich_help_panel=_ENDPOINTS),
    max_retries: int = typer.Option(4, "--max-retries", help="Endpoints: retries of a failed request (backoff) before it is recorded as failed.", rich_help_panel=_ENDPOINTS),
    # "\[ray]": rich would take [ray] for markup and print pip install 'medusa-bench'.
    workers: Optional[int] = typer.Option(None, "--workers", help="Shard the questions over N Ray workers (a local Ray instance unless --ray-address); needs pip install 'medusa-bench\\[ray]'. Judging is concurrent already: `judge --parallel`.", rich_help_panel=_SCALE),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join this Ray cluster ('auto': the one RAY_ADDRESS or `ray start` names); workers default to as many as fit.", rich_help_panel=_SCALE),
    gpus_per_worker: Optional[float] = typer.Option(None, "--gpus-per-worker", help="GPUs per Ray worker (default 1 where the cluster has GPUs, else 0).", rich_help_panel=_SCALE),
    cpus_per_worker: int = typer.Option(1, "--cpus-per-worker", help="CPU cores per Ray worker (its torch threads on CPU).", rich_help_panel=_SCALE),
    **decoder_options,
) -> None:
    from medusa_bench.bench.loop import RunConfig, run_benchmark

    config = RunConfig.from_cli(
        model=model, decoders=decoders or "baseline", bench=bench, questions=questions, limit=limit,
        question_ids=question_ids, categories=categories, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed, warmup=warmup, out=out, device=device,
        dtype=dtype, decoder_options=decoder_options, trust_remote_code=trust_remote_code,
        control=control, precision_reference=precision_reference, remeasure_flagged=remeasure_flagged,
        cache=cache, compile=compile, workers=workers, ray_address=ray_address, gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker,
    )
    if endpoint and config.on_cluster:
        raise UserError("--endpoint runs send requests from one process (--concurrency sets how many in flight): drop --workers/--ray-address")
    if endpoint:
        from medusa_bench.bench.endpoints import EndpointRun, parse_concurrency, parse_endpoints, run_endpoint_benchmark

        served = EndpointRun(parse_endpoints(endpoint), reference=reference, model=endpoint_model, api_key_env=api_key_env,
                             metrics_url=metrics_url, concurrency=parse_concurrency(concurrency), timeout=request_timeout,
                             max_retries=max_retries)
        if decoders or control:  # in-process decoders beside the endpoints: the model loads here too
            run_dir = run_benchmark(config, console=console, endpoints=served)
        else:  # endpoints alone: no local model
            run_dir = run_endpoint_benchmark(config, served, console=console)
    elif reference or concurrency:
        raise UserError("--reference and --concurrency are for --endpoint runs: add --endpoint NAME=URL")
    else:
        run_dir = run_benchmark(config, console=console)
    _finish_run(run_dir)


def _finish_run(run_dir: Path) -> None:
    """The at-a-glance table (stderr), the run folder (stdout), and exit code 3 when answers are missing."""
    from medusa_bench.bench.failed import missing_answers
    from medusa_bench.results.report import at_a_glance

    at_a_glance([run_dir], console)
    typer.echo(str(run_dir))
    if missing_answers(run_dir):
        raise typer.Exit(ANSWERS_MISSING_EXIT)


# -------------------------------------------------------------------------------------- judge
@app.command()
def judge(
    run_dir: Path = typer.Argument(..., help="A run folder made by `medusa-bench run`."),
    judge_model: str = typer.Option("gpt-4", "--judge-model", help="The judge's model name at the endpoint."),
    judge_base_url: Optional[str] = typer.Option(None, "--judge-base-url", help="An OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (default: OpenAI)."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="Environment variable holding the API key (never written anywhere)."),
    mode: str = typer.Option("single", "--mode", help="single (grades 1-10) | pairwise (each decoder vs the baseline, both orders)."),
    parallel: int = typer.Option(8, "--parallel", help="Concurrent judge calls."),
    decoders: Optional[str] = typer.Option(None, "--decoders", help="Comma-separated decoders (or model ids) to judge; default all."),
    baseline: str = typer.Option("baseline", "--baseline", help="The reference decoder for reuse and pairwise mode."),
    no_reuse: bool = typer.Option(False, "--no-reuse", help="Judge answers identical to the baseline's too, instead of reusing its judgment."),
    score: str = typer.Option("text", "--score", help="text (the rating written in the judgment) | logprobs (expected rating from the rating token's logprobs)."),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="Token limit of each judgment."),
    timeout: float = typer.Option(120.0, "--timeout", help="Seconds per judge call before it is retried."),
    max_retries: int = typer.Option(6, "--max-retries", help="Retries on rate limits, timeouts, connection errors and 5xx."),
    questions: Optional[Path] = typer.Option(None, "--questions", help="Question file (default: the run's)."),
    judge_prompts: Optional[Path] = typer.Option(None, "--judge-prompts", help="FastChat judge_prompts.jsonl."),
    reference_answers: Optional[Path] = typer.Option(None, "--reference-answers", help="Reference answers (FastChat reference_answer/gpt-4.jsonl)."),
    retry_unparseable: bool = typer.Option(False, "--retry-unparseable", help="Ask the judge again for judgments stored as unparseable (score -1); the new one replaces the old line."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say how many requests, and about how many tokens, the judgment would send; send nothing (no API key needed)."),
) -> None:
    """Grade a run's answers with an LLM judge (MT-Bench style); resumes where it stopped."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from medusa_bench.judge.client import RetryPolicy
    from medusa_bench.judge.run import judge_run
    from medusa_bench.judge.summary import summary_table

    selected = [d.strip() for d in decoders.split(",") if d.strip()] if decoders else None
    if dry_run:
        result = judge_run(run_dir, judge_model=judge_model, base_url=judge_base_url, mode=mode, decoders=selected, baseline=baseline,
                           reuse=not no_reuse, score=score, max_tokens=max_tokens, questions=questions, judge_prompts=judge_prompts,
                           reference_answers=reference_answers, retry_unparseable=retry_unparseable, dry_run=True)
        typer.echo(result.dry_run.line())
        return
    with Progress(TextColumn("judging"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("judge", total=None)
        result = judge_run(
            run_dir, judge_model=judge_model, base_url=judge_base_url, api_key_env=api_key_env, mode=mode,
            parallel=parallel, decoders=selected,
            baseline=baseline, reuse=not no_reuse, score=score, max_tokens=max_tokens, timeout=timeout,
            retry=RetryPolicy(max_retries=max_retries), questions=questions, judge_prompts=judge_prompts,
            reference_answers=reference_answers, progress=lambda done, total: bar.update(task, completed=done, total=total),
            retry_unparseable=retry_unparseable,
        )
    Console().print(summary_table(result))
    console.print(
        f"{result.judged} judged, {result.reused} reused, {result.skipped} already done, "
        f"{result.unparsed} unparseable (kept, counted as missing)" + (f", {result.retried} re-asked" if retry_unparseable else "")
    )
    typer.echo(str(result.path))


# ------------------------------------------------------------------------------------- report
@app.command()
def report(
    run_dirs: List[Path] = typer.Argument(..., metavar="RUN_DIR...", help="One or more run folders (side by side)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (a folder for csv). Default: <run>/report.html for one run, ./report.html for several."),
    fmt: str = typer.Option("html", "--format", "-f", help="html | markdown | csv | table"),
) -> None:
    """Turn run folders into tables and a self-contained HTML report."""
    from medusa_bench.results.report import build_report

    result = build_report(run_dirs, out=out, fmt=fmt, console=Console() if fmt == "table" else None)
    if result:
        typer.echo(str(result).rstrip("\n"))


# -------------------------------------------------------------------------------------- serve
@app.command()
@decoder_options("serve")
def serve(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Hub id, local folder, .gguf file or 'smollm2-135m'."),
    decoder: str = typer.Option("baseline", "--decoder", "-d", help="{decoders}"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | float16 | bfloat16"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (this machine only by default)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MEDUSA_BENCH_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/* (or set MEDUSA_BENCH_API_KEY)."),
    max_waiting: int = typer.Option(16, "--max-waiting", help="Requests that may wait behind the running ones; more get 503."),
    max_batch: int = typer.Option(8, "--max-batch", help="Plain decoders (baseline): requests decoded together in one batch. Drafting decoders run one at a time."),
    heads: Optional[List[str]] = typer.Option(None, "--heads", help="NAME=PATH: more heads for the --decoder (one that loads heads) on the same base model (repeatable); a request picks one with model '<model>:NAME' or LoRAX's adapter_id."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="Model id clients use (default <model>-<decoder>)."),
    cache: str = _CACHE,
    compile: str = _COMPILE,
    **decoder_options,
) -> None:
    """Serve a decoder behind an OpenAI-compatible HTTP API (chat completions, streaming, /metrics)."""
    from medusa_bench.decoders.options import DecoderOptions
    from medusa_bench.serve.app import serve as serve_forever

    options = DecoderOptions(**decoder_options)
    serve_forever(
        model=model, decoder=decoder, options=options, host=host, port=port, api_key=api_key,
        max_waiting=max_waiting, max_batch=max_batch, heads=heads, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
        cache=cache, compile=compile, served_model_name=served_model_name, log=lambda line: console.print(line, highlight=False, soft_wrap=True),
    )


# ------------------------------------------------------------------------- distill and train
@app.command()
def distill(
    prompts: List[Path] = typer.Option([], "--prompts", "-p", help="Prompt files: self_instruct, GSM8K train, ShareGPT (repeat the option)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output ShareGPT jsonl (appended; re-run to resume)."),
    extend: List[Path] = typer.Option([], "--extend", help="Conversations an earlier distill wrote: keep their answers, add the --follow-up turn."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Hub id, local folder, .gguf file or 'smollm2-135m'."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", help="Token limit per answer."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p"),
    samples_per_prompt: int = typer.Option(1, "--samples-per-prompt", help="Sampled answers per prompt (needs --temperature > 0)."),
    follow_up: str = typer.Option("none", "--follow-up", help="Second turn for one-turn prompts: none | generic | model (the model writes the user's next question)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Prompts per batched generate (left padded, sorted by length)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="At most N prompts from each file."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | float16 | bfloat16"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
) -> None:
    """Self-distillation: the model answers training prompts (never benchmark questions); ShareGPT jsonl out."""
    from medusa_bench.models import load_model
    from medusa_bench.train.distill import distill as run_distill

    loaded = load_model(model, device, dtype, trust_remote_code)
    result = run_distill(loaded, prompts, out, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         samples_per_prompt=samples_per_prompt, follow_up=follow_up, extend=tuple(extend),
                         batch_size=batch_size, limit=limit, seed=seed, console=console)
    console.print(f"{result.written} conversations written ({result.skipped} already there), {result.new_tokens} tokens "
                  f"in {result.seconds:.0f} s ({result.tokens_per_second:.1f} tok/s), {result.truncated} answers cut at the limit, "
                  f"{result.near_benchmark} prompts dropped as close to a benchmark question")
    typer.echo(str(result.out))


@datastore_app.command("build")
def datastore_build(
    source: Path = typer.Option(..., "--from", help="Corpus: ShareGPT jsonl (its assistant answers, e.g. `distill`'s output) or plain text; never benchmark questions."),
    out: Path = typer.Option(..., "--out", "-o", help="The datastore file the rest decoder reads (--rest-datastore)."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Whose tokenizer: hub id, local folder, .gguf file or 'smollm2-135m'."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow tokenizer code from the hub (off by default)."),
) -> None:
    """Tokenize a corpus with the model's tokenizer and index it for the `rest` decoder."""
    from transformers import AutoTokenizer

    from medusa_bench.decoders.rest import build_datastore
    from medusa_bench.models import resolve_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_source(model)[0], trust_remote_code=trust_remote_code)
    store = build_datastore(tokenizer, source, out)
    console.print(f"{len(store.tokens)} tokens indexed")
    typer.echo(str(out))


@app.command()
def instructions(
    seeds: List[Path] = typer.Option(..., "--seeds", help="Seed tasks: self_instruct jsonl files (repeat the option)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output self_instruct-style jsonl (appended; re-run to resume)."),
    count: int = typer.Option(..., "--count", "-n", help="How many new instructions the file should hold."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Hub id, local folder, .gguf file or 'smollm2-135m'."),
    batch_size: int = typer.Option(32, "--batch-size"),
    temperature: float = typer.Option(0.9, "--temperature"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | float16 | bfloat16"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
) -> None:
    """New training instructions written by the model from seed tasks (self-instruct bootstrapping), for `distill`."""
    from medusa_bench.models import load_model
    from medusa_bench.train.instructions import bootstrap_instructions, check_count

    check_count(count)
    loaded = load_model(model, device, dtype, trust_remote_code)
    tally = bootstrap_instructions(loaded, seeds, count, out, batch_size=batch_size, temperature=temperature, seed=seed,
                                   console=console)
    console.print(f"{out} holds {tally['total']}; kept {tally['kept']} of {tally['generated']} written; dropped: {tally['near_copy']} near-copies, "
                  f"{tally['bad_length']} too short or long, {tally['benchmark_overlap']} close to a benchmark question")
    if tally["total"] < count:
        console.print(f"[yellow]stopped short of {count}: this model keeps too few of the tasks it writes; "
                      "pass more --seeds or a larger model[/yellow]")
    typer.echo(str(out))


_DATA = typer.Option(..., "--data", help="ShareGPT jsonl (e.g. from `medusa-bench distill`).")
_OUT = typer.Option(..., "--out", "-o", help="Output folder for the heads.")
_MODEL = typer.Option("smollm2-135m", "--model", "-m", help="Hub id, local folder, .gguf file or 'smollm2-135m'.")
_HEADS = typer.Option(4, "--heads", help="Number of Medusa heads.")
_HELDOUT = typer.Option(0.05, "--heldout", help="Fraction of sequences held out for accuracy and early stopping.")
_MAX_MINUTES = typer.Option(None, "--max-minutes", help="Stop optimising after this many minutes (keeps the best weights).")
_MAX_LENGTH = typer.Option(None, "--max-length", help="Truncate sequences to N tokens (default: the model's context).")
_SOFTMAX = typer.Option("active", "--softmax", help="active (training softmax over the tokens seen as targets: faster) | full.")
_SAVE_DTYPE = typer.Option("float16", "--save-dtype", help="float32 | float16 | bfloat16 for the written weights.")
_HIDDEN_CACHE = typer.Option(None, "--hidden-cache", help="Folder for cached base hidden states (default: user cache; 'none': off).")
_LAYERS = typer.Option(1, "--layers", help="ResBlocks per head.")
_LM_HEAD = typer.Option("shared", "--lm-head", help="shared (heads end in the base lm_head: a few MB) | own.")
_EPOCHS = typer.Option(10, "--epochs")
_LR = typer.Option(1e-3, "--lr")
_PATIENCE = typer.Option(2, "--patience", help="Epochs without a better held-out loss before stopping.")
_SEED = typer.Option(0, "--seed")
_DEVICE = typer.Option("auto", "--device")
_DTYPE = typer.Option("auto", "--dtype")


def _train(fit, config, model: str, device: str, dtype: str, data: Path, out: Path) -> None:
    """What every `train` command does once its options are a config: check, load, fit, say where."""
    from medusa_bench.models import load_model

    config.check()
    result = fit(load_model(model, device, dtype), data, out, config, console=console)
    console.print(f"held-out: {result.best}")
    typer.echo(str(result.out))


@train_app.command("medusa")
def train_medusa(
    data: Path = _DATA, out: Path = _OUT, model: str = _MODEL, heads: int = _HEADS,
    layers: int = _LAYERS, lm_head: str = _LM_HEAD,
    epochs: int = _EPOCHS, batch_size: int = typer.Option(256, "--batch-size", help="Positions per step."),
    lr: float = _LR, heldout: float = _HELDOUT, patience: int = _PATIENCE,
    max_minutes: Optional[float] = _MAX_MINUTES, max_length: Optional[int] = _MAX_LENGTH, softmax: str = _SOFTMAX,
    save_dtype: str = _SAVE_DTYPE, seed: int = _SEED, hidden_cache: Optional[str] = _HIDDEN_CACHE,
    device: str = _DEVICE, dtype: str = _DTYPE,
) -> None:
    """Medusa-1: train heads on a frozen base model (loss on assistant tokens; held-out accuracy; calibration.json)."""
    from medusa_bench.train.fit import FitConfig, train_medusa as fit

    config = FitConfig(num_heads=heads, num_layers=layers, lm_head=lm_head, epochs=epochs, batch_size=batch_size, lr=lr,
                       heldout=heldout, patience=patience, max_minutes=max_minutes, max_length=max_length, softmax=softmax,
                       save_dtype=save_dtype, seed=seed, hidden_cache=hidden_cache)
    _train(fit, config, model, device, dtype, data, out)


@train_app.command("medusa2")
def train_medusa2(
    data: Path = _DATA, out: Path = _OUT, model: str = _MODEL, heads: int = _HEADS,
    init_heads: Optional[str] = typer.Option(None, "--init-heads", help="Start from these Medusa-1 heads (else warm up first)."),
    warmup_epochs: int = typer.Option(2, "--warmup-epochs", help="Medusa-1 epochs before joint training (without --init-heads)."),
    epochs: int = typer.Option(1, "--epochs"), batch_size: int = typer.Option(4, "--batch-size", help="Sequences per step."),
    lr: float = typer.Option(2e-4, "--lr", help="LoRA learning rate."), heads_lr: float = typer.Option(5e-4, "--heads-lr"),
    lora_r: int = typer.Option(8, "--lora-r"), lora_alpha: int = typer.Option(16, "--lora-alpha"),
    lora_layers: int = typer.Option(0, "--lora-layers", help="Adapt only the last N decoder layers (0: all)."),
    heads_coefficient: float = typer.Option(0.2, "--heads-coefficient", help="lambda: weight of the head losses."),
    heads_decay: float = typer.Option(0.8, "--heads-decay", help="Head k's loss weight is lambda * decay^k."),
    heldout: float = _HELDOUT, patience: int = typer.Option(1, "--patience"), max_minutes: Optional[float] = _MAX_MINUTES,
    max_length: Optional[int] = _MAX_LENGTH, softmax: str = _SOFTMAX, save_dtype: str = _SAVE_DTYPE,
    full_model: bool = typer.Option(False, "--full-model", help="Write a full merged model folder instead of the compact adapter."),
    seed: int = _SEED, hidden_cache: Optional[str] = _HIDDEN_CACHE,
    device: str = _DEVICE, dtype: str = _DTYPE,
) -> None:
    """Medusa-2: LoRA on the backbone + heads, KL self-distillation to the frozen model; the medusa2 decoder loads the folder."""
    from medusa_bench.train.medusa2 import Medusa2Config, train_medusa2 as fit

    config = Medusa2Config(num_heads=heads, init_heads=init_heads, warmup_epochs=warmup_epochs, epochs=epochs,
                           batch_size=batch_size, lr=lr, heads_lr=heads_lr, lora_r=lora_r, lora_alpha=lora_alpha,
                           lora_layers=lora_layers, heads_coefficient=heads_coefficient, heads_decay=heads_decay,
                           heldout=heldout, patience=patience, max_minutes=max_minutes, max_length=max_length,
                           softmax=softmax, save_dtype=save_dtype, full_model=full_model, seed=seed, hidden_cache=hidden_cache)
    _train(fit, config, model, device, dtype, data, out)


# --------------------------------------------------------------------------------------- tree
@app.command("tree")
@decoder_options("tree")
def tree_command(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Hub id, local folder, .gguf file or 'smollm2-135m'."),
    decoder: str = typer.Option("medusa", "--decoder", "-d", help="Whose heads: {tree_decoders}."),
    max_nodes: int = typer.Option(64, "--max-nodes", help="Largest tree, root included."),
    max_depth: Optional[int] = typer.Option(None, "--max-depth", help="Deepest path (default: every head)."),
    top_k: int = typer.Option(10, "--top-k", help="Candidates per head that calibration ranks."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Prompts file (.jsonl / text) to measure on, or a calibration.json to use as is (default: the heads' own held-out calibration.json, else self-instruct prompts)."),
    prompts: int = typer.Option(16, "--prompts", help="Calibration prompts."),
    tokens: int = typer.Option(64, "--tokens", help="Greedy answer tokens per calibration prompt."),
    context_len: int = typer.Option(300, "--context-len", help="Cached tokens when a step is timed."),
    repeats: int = typer.Option(10, "--repeats", help="Timed steps per tree size (median)."),
    min_speedup: float = typer.Option(1.03, "--min-speedup", help="A tree must predict this much over the baseline, else the empty tree."),
    refresh: bool = typer.Option(False, "--refresh", help="Measure again even if the cache holds these tables."),
    out: Path = typer.Option(Path("tree.json"), "--out", "-o", help="tree.json to write; calibration.json and latency.json go beside it."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | float16 | bfloat16"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
    cache: str = _CACHE,
    compile: str = _COMPILE,
    **decoder_options,
) -> None:
    """Find the fastest candidate tree for these heads on this model and device (what `run --tree auto` uses)."""
    from medusa_bench.bench.autotree import AutoTreeSettings, save_tree_files, size_tree, summary_table
    from medusa_bench.decoders.options import DecoderOptions
    from medusa_bench.models import load_model
    from medusa_bench.runtime.engine import check_options, use_engine

    settings = AutoTreeSettings(max_nodes=max_nodes, max_depth=max_depth, top_k=top_k, prompts=prompts, tokens=tokens,
                                calibration=str(calibration) if calibration else None, context_len=context_len,
                                repeats=repeats, min_speedup=min_speedup, refresh=refresh)
    options = DecoderOptions(**{**decoder_options, "tree": "auto"}, extra={"autotree": settings})
    check_options(cache, compile)
    loaded = load_model(model, device, dtype, trust_remote_code)
    use_engine(loaded, cache, compile)  # step times are this engine's
    auto = size_tree(decoder, loaded, options)
    Console().print(summary_table(auto))
    for path in save_tree_files(auto, out).values():
        typer.echo(str(path))


# -------------------------------------------------------------------------------- train hydra
@train_app.command("hydra")
def train_hydra(
    data: Path = _DATA, out: Path = _OUT, model: str = _MODEL,
    heads: int = typer.Option(4, "--heads", help="Number of Hydra heads (tree depth)."),
    arch: str = typer.Option("mlp", "--arch", help="mlp (Hydra) | prefix-mlp (Hydra++: one prefix attention layer)."),
    loss: str = typer.Option("teacher", "--loss", help="teacher (the base model's distribution: Hydra++) | data (the data tokens) | both."),
    layers: int = _LAYERS, lm_head: str = _LM_HEAD,
    epochs: int = _EPOCHS, batch_size: int = typer.Option(256, "--batch-size", help="Assistant tokens per step (whole sequences)."),
    lr: float = _LR, heldout: float = _HELDOUT, patience: int = _PATIENCE,
    max_minutes: Optional[float] = _MAX_MINUTES, max_length: Optional[int] = _MAX_LENGTH, softmax: str = _SOFTMAX,
    save_dtype: str = _SAVE_DTYPE, seed: int = _SEED, hidden_cache: Optional[str] = _HIDDEN_CACHE,
    device: str = _DEVICE, dtype: str = _DTYPE,
) -> None:
    """Hydra: heads conditioned on the drafted tokens above them, on a frozen base model (held-out accuracy; calibration.json)."""
    from medusa_bench.train.hydra import HydraFitConfig, train_hydra as fit

    config = HydraFitConfig(num_heads=heads, num_layers=layers, arch=arch, loss=loss, lm_head=lm_head, epochs=epochs,
                            batch_size=batch_size, lr=lr, heldout=heldout, patience=patience, max_minutes=max_minutes,
                            max_length=max_length, softmax=softmax, save_dtype=save_dtype, seed=seed, hidden_cache=hidden_cache)
    _train(fit, config, model, device, dtype, data, out)


# -------------------------------------------------------------------------------- train eagle
@train_app.command("eagle")
def train_eagle(
    data: Path = _DATA, out: Path = _OUT, model: str = _MODEL,
    eagle3: bool = typer.Option(False, "--eagle3", help="EAGLE-3 heads: three fused feature layers, their own draft vocabulary, training-time test."),
    ttt_steps: int = typer.Option(0, "--ttt-steps", help="Depths the draft is unrolled to per example (0: the paper's: 1 for EAGLE-1/2, 3 for EAGLE-3)."),
    noise: Optional[float] = typer.Option(None, "--noise", help="Uniform noise width on input features (default: 0.2 for EAGLE-1/2, 0 for EAGLE-3)."),
    draft_vocab: int = typer.Option(4096, "--draft-vocab", help="EAGLE-3: size of the heads' own vocabulary (most frequent answer tokens)."),
    depth: int = typer.Option(5, "--depth", help="Depths held-out accuracy and calibration.json cover."),
    epochs: int = _EPOCHS, batch_size: int = typer.Option(256, "--batch-size", help="Assistant tokens per step (whole sequences)."),
    lr: float = typer.Option(5e-4, "--lr"), heldout: float = _HELDOUT, patience: int = _PATIENCE,
    max_minutes: Optional[float] = _MAX_MINUTES, max_length: Optional[int] = _MAX_LENGTH, softmax: str = _SOFTMAX,
    save_dtype: str = _SAVE_DTYPE, seed: int = _SEED, hidden_cache: Optional[str] = _HIDDEN_CACHE,
    device: str = _DEVICE, dtype: str = _DTYPE,
) -> None:
    """EAGLE-1/2 (or --eagle3): a one-layer draft model over the base model's features, on a frozen base (held-out accuracy per depth; calibration.json)."""
    from medusa_bench.train.eagle import EagleFitConfig, train_eagle as fit

    config = EagleFitConfig(variant="eagle3" if eagle3 else "eagle", num_heads=depth, ttt_steps=ttt_steps, noise=noise,
                            draft_vocab=draft_vocab, epochs=epochs, batch_size=batch_size, lr=lr, heldout=heldout,
                            patience=patience, max_minutes=max_minutes, max_length=max_length, softmax=softmax,
                            save_dtype=save_dtype, seed=seed, hidden_cache=hidden_cache)
    _train(fit, config, model, device, dtype, data, out)


# ---------------------------------------------------------------------------------------- main
def quiet_libraries() -> None:
    """Deprecation notices from inside torch/transformers say nothing the user can act on;
    MEDUSA_BENCH_DEBUG=1 shows them (and tracebacks)."""
    if os.environ.get("MEDUSA_BENCH_DEBUG"):
        return
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    """Entry point: UserError → one line on stderr, exit 2 (traceback with MEDUSA_BENCH_DEBUG=1)."""
    quiet_libraries()
    from medusa_bench.decoders.options import COMMANDS

    DecoderCommand.wanted = any(arg in COMMANDS for arg in sys.argv[1:2])
    try:
        if DecoderCommand.wanted:
            fill_decoder_names()
        app()
    except UserError as error:
        if os.environ.get("MEDUSA_BENCH_DEBUG"):
            raise
        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)  # "medusa-bench[ray]" is no markup
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted: finished answers are saved; re-run the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
