"""The commands that decode, grade and report: `run`, `judge`, `report`, `serve`, `tree`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from medusa_bench.bench.failed import ANSWERS_MISSING_EXIT
from medusa_bench.errors import UserError
from medusa_bench.cli.app import _CACHE, _COMPILE, _cache_option, _compile_option, app, canonical_dtype, console, decoder_options


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
    decoders: Optional[str] = typer.Option(None, "--decoders", "-d", help="Comma-separated decoder names (default: baseline; with --endpoint: none, the endpoints alone); the group spec-bench is the baseline and Spec-Bench's leaderboard methods in its order; hydra:sweep is hydra:auto beside fixed trees (chain-1…4, tree-8/16/32, mc_sim_7b_63).", rich_help_panel=_WHAT),
    bench: str = typer.Option("mt_bench", "--bench", help="mt_bench | spec_bench | quick", rich_help_panel=_WHAT),
    questions: Optional[Path] = typer.Option(None, "--questions", help="A FastChat question.jsonl (overrides --bench lookup).", rich_help_panel=_WHAT),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N questions.", rich_help_panel=_WHAT),
    question_ids: Optional[str] = typer.Option(None, "--question-ids", help="Comma-separated question ids, e.g. 81,82.", rich_help_panel=_WHAT),
    categories: Optional[str] = typer.Option(None, "--categories", help="Comma-separated categories, e.g. math,coding.", rich_help_panel=_WHAT),
    per_task: Optional[int] = typer.Option(None, "--per-task", help="The first N questions of each task (spec_bench: its six tasks; multi-turn spread over its 8 MT-Bench categories).", rich_help_panel=_WHAT),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Token limit per turn.", rich_help_panel=_WHAT),
    temperature: str = typer.Option("0", "--temperature", help="A number, or 'category' for FastChat's per-category temperatures.", rich_help_panel=_WHAT),
    top_p: float = typer.Option(1.0, "--top-p", rich_help_panel=_WHAT),
    seed: int = typer.Option(0, "--seed", rich_help_panel=_WHAT),
    warmup: int = typer.Option(1, "--warmup", help="Untimed warm-up generations per decoder.", rich_help_panel=_WHAT),
    control: bool = typer.Option(False, "--control", help="Add the A/A control: the baseline's work timed again as decoder 'control' (the noise floor).", rich_help_panel=_WHAT),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Hub id, local folder, .gguf file or 'smollm2-135m'.", rich_help_panel=_MODEL),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda", rich_help_panel=_MODEL),
    dtype: str = typer.Option("auto", "--dtype", callback=canonical_dtype, help="auto (CPU: bf16 if it is native and measures faster, else fp32; CUDA: bf16, else fp16) | float32 | float16 | bfloat16 (or fp32, fp16, bf16)", rich_help_panel=_MODEL),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub (off by default).", rich_help_panel=_MODEL),
    precision_reference: str = typer.Option("auto", "--precision-reference", help="float32 | none: decode the baseline again in fp32 (untimed) to show what the precision changes; auto: float32 unless the run is fp32.", rich_help_panel=_MODEL),
    cache: str = _cache_option(_MODEL),
    compile: str = _compile_option(_MODEL),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default results/<model>-<bench>); the same command again resumes it.", rich_help_panel=_OUTPUT),
    batch_size: Optional[str] = typer.Option(None, "--batch-size", help="After the answers, every decoder again with this many requests decoded together, e.g. 1,4,16 (greedy; appended to batch.jsonl; the same command resumes).", rich_help_panel=_OUTPUT),
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
    from medusa_bench.bench.batch_sweep import check_batch_run, parse_batch_sizes
    from medusa_bench.bench.loop import RunConfig, run_benchmark

    config = RunConfig.from_cli(
        model=model, decoders=decoders or "baseline", bench=bench, questions=questions, limit=limit,
        question_ids=question_ids, categories=categories, per_task=per_task, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed, warmup=warmup, out=out, device=device,
        dtype=dtype, decoder_options=decoder_options, trust_remote_code=trust_remote_code,
        control=control, precision_reference=precision_reference, remeasure_flagged=remeasure_flagged,
        cache=cache, compile=compile, workers=workers, ray_address=ray_address, gpus_per_worker=gpus_per_worker,
        cpus_per_worker=cpus_per_worker, batch_sizes=parse_batch_sizes(batch_size),
    )
    check_batch_run(config)
    if endpoint and config.on_cluster:
        raise UserError("--endpoint runs send requests from one process (--concurrency sets how many in flight): drop --workers/--ray-address")
    if endpoint:
        from medusa_bench.bench.endpoints import EndpointRun, parse_concurrency, parse_endpoints, run_endpoint_benchmark

        served = EndpointRun(parse_endpoints(endpoint), reference=reference, model=endpoint_model, api_key_env=api_key_env,
                             metrics_url=metrics_url, concurrency=parse_concurrency(concurrency), timeout=request_timeout,
                             max_retries=max_retries)
        if config.batch_sizes and not decoders:
            raise UserError("--batch-size batches the in-process decoders: add --decoders baseline,… (endpoints batch by --concurrency)")
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
    dtype: str = typer.Option("auto", "--dtype", callback=canonical_dtype, help="auto | float32 | float16 | bfloat16 (or fp32, fp16, bf16)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (this machine only by default)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MEDUSA_BENCH_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1/* (or set MEDUSA_BENCH_API_KEY)."),
    max_waiting: int = typer.Option(16, "--max-waiting", help="Requests that may wait behind the running ones; more get 503."),
    max_batch: int = typer.Option(8, "--max-batch", help="Requests decoded together in one batch; a drafting decoder batches greedy requests without logprobs (one verify forward over every row's tree), others one at a time."),
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


# --------------------------------------------------------------------------------------- tree
@app.command("tree")
@decoder_options("tree")
def tree_command(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Hub id, local folder, .gguf file or 'smollm2-135m'."),
    decoder: str = typer.Option("medusa", "--decoder", "-d", help="Whose heads: {tree_decoders}."),
    max_nodes: int = typer.Option(64, "--max-nodes", help="Largest tree, root included."),
    max_depth: Optional[int] = typer.Option(None, "--max-depth", help="Deepest path (default: every head)."),
    top_k: int = typer.Option(10, "--top-k", help="Candidates per head that calibration ranks."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Prompts file (.jsonl / text) to measure on, or a calibration.json to use as is (default: the self-instruct prompts, both turns; the heads' own held-out calibration.json where the data folder is absent)."),
    prompts: int = typer.Option(16, "--prompts", help="Calibration prompts (the default file holds 64 out of training for this: at most 64)."),
    tokens: int = typer.Option(64, "--tokens", help="Greedy answer tokens per calibration prompt and turn."),
    turns: int = typer.Option(2, "--turns", help="Calibration turns: 2 answers a generic follow-up too (a benchmark's turn-2 contexts)."),
    context_len: int = typer.Option(300, "--context-len", help="Cached tokens when a step is timed."),
    repeats: int = typer.Option(10, "--repeats", help="Profile rounds: each times one decoding step per tree size beside the baseline's."),
    min_speedup: Optional[float] = typer.Option(None, "--min-speedup", help="A tree must predict this much over the baseline, else the empty tree (default: 1 + the 95% half-width of its own prediction, measured)."),
    refresh: bool = typer.Option(False, "--refresh", help="Measure again even if the cache holds these tables."),
    out: Path = typer.Option(Path("tree.json"), "--out", "-o", help="tree.json to write; calibration.json and latency.json go beside it."),
    export: Optional[str] = typer.Option(None, "--export", help="vllm,sglang,trtllm: also write the chosen tree as those engines' speculative configuration (<engine>-config.json beside tree.json)."),
    audit: Optional[Path] = typer.Option(None, "--audit", metavar="RUN_DIR", help="Instead: check a finished run's --tree auto predictions against its own answers (τ replayed on them, step cost, the tree best in hindsight); writes RUN_DIR/prediction.json, which `run` writes itself at its end."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", "--dtype", callback=canonical_dtype, help="auto | float32 | float16 | bfloat16 (or fp32, fp16, bf16)"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code from the hub (off by default)."),
    cache: str = _CACHE,
    compile: str = _COMPILE,
    **decoder_options,
) -> None:
    """Find the fastest candidate tree for these heads on this model and device (what `run --tree auto` uses)."""
    if audit is not None:
        from medusa_bench.bench.audit import AUDIT_FILE, audit_folder

        audit_folder(audit, log=lambda line: console.print(line, highlight=False, soft_wrap=True))
        typer.echo(str(audit / AUDIT_FILE))
        return
    from medusa_bench.bench.autotree import AutoTreeSettings, save_tree_files, size_tree, summary_table
    from medusa_bench.decoders.options import DecoderOptions
    from medusa_bench.models import load_model
    from medusa_bench.runtime.engine import check_options, use_engine

    engines = [name.strip() for name in export.split(",") if name.strip()] if export else []
    from medusa_bench.trees.engine_config import engine_config
    from medusa_bench.trees.tree import Tree

    for engine in engines:  # a name or method an engine lacks is one line before the slow part
        engine_config(Tree.empty(), engine, decoder)
    settings = AutoTreeSettings(max_nodes=max_nodes, max_depth=max_depth, top_k=top_k, prompts=prompts, tokens=tokens,
                                turns=turns, calibration=str(calibration) if calibration else None, context_len=context_len,
                                repeats=repeats, min_speedup=min_speedup, refresh=refresh)
    options = DecoderOptions(**{**decoder_options, "tree": "auto"}, extra={"autotree": settings})
    check_options(cache, compile)
    loaded = load_model(model, device, dtype, trust_remote_code)
    use_engine(loaded, cache, compile)  # step times are this engine's
    auto = size_tree(decoder, loaded, options)
    Console().print(summary_table(auto))
    for path in save_tree_files(auto, out).values():
        typer.echo(str(path))
    for engine in engines:
        config = engine_config(auto.tree, engine, decoder)
        path = Path(out).parent / f"{engine}-config.json"
        path.write_text(json.dumps(config, indent=1) + "\n")
        console.print(f"{engine}: {config['note']}" + (f"\n  {' '.join(config['flags'])}" if config["flags"] else ""),
                      highlight=False, soft_wrap=True)
        typer.echo(str(path))
