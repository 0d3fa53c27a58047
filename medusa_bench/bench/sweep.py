"""The concurrency sweep (`run --endpoint … --concurrency 1,4,16`): every question's turns again at
each level with that many requests in flight, endpoint by endpoint; one line per endpoint × level
in `sweep.jsonl` (throughput, per-request tokens/s, TTFT and ITL percentiles, τ and where it came
from). For SGLang the line also notes the server's own lifetime average accept length.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from pathlib import Path

from rich.console import Console

from medusa_bench.bench.endpoint_client import Endpoint, RequestFailed, counter_delta, steps_from_counters
from medusa_bench.inputs.chat import conversation
from medusa_bench.inputs.questions import Question
from medusa_bench.results import files

SWEEP_FILE = "sweep.jsonl"


def percentiles(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(np.asarray(values, dtype=float), [50, 90, 99])
    return {"p50": round(float(p50), 6), "p90": round(float(p90), 6), "p99": round(float(p99), 6)}


def sweep_requests(questions: list[Question], answers: dict, config) -> list[tuple[list[dict], object]]:
    """Every turn of every question as (messages, sampling); turn 2 carries the endpoint's own turn-1 answer."""
    requests = []
    for question in questions:
        record = answers.get(str(question.question_id))
        given = record["choices"][0]["turns"] if record else []
        for turn in range(len(question.turns)):
            if turn > len(given):
                break
            requests.append((conversation(question.turns[: turn + 1], given[:turn]), config.sampling_for(question)))
    return requests


def sweep_level(endpoint: Endpoint, requests: list, level: int, config, count_tokens) -> dict:
    """All requests with `level` in flight (a bounded pool); server-side throughput and latency percentiles."""
    before = endpoint.scrape()
    start = time.perf_counter()
    turns, errors = [], []

    def one(item):
        messages, sampling = item
        return endpoint.chat(messages, config.max_new_tokens, sampling.temperature, sampling.top_p, sampling.seed, count_tokens)

    with cf.ThreadPoolExecutor(max_workers=level, thread_name_prefix=f"sweep-{endpoint.name}") as pool:
        for future in cf.as_completed([pool.submit(one, item) for item in requests]):
            try:
                turns.append(future.result())
            except RequestFailed as error:
                errors.append(str(error))
    elapsed = time.perf_counter() - start
    counters = counter_delta(before, endpoint.scrape())
    tokens = sum(t.completion_tokens for t in turns)
    verify = [t.verify_steps for t in turns]
    if counters and counters["tau"] is not None and tokens:  # tokens per step, as every τ here (not 1 + accepted / drafts)
        tau, tau_from = round(tokens / steps_from_counters(counters, tokens), 6), "metrics"
    elif turns and all(v for v in verify):
        tau, tau_from = round(tokens / sum(verify), 6), "per-request"
    else:
        tau, tau_from = None, None
    return {
        "endpoint": endpoint.name, "model": endpoint.model, "concurrency": level, "requests": len(requests),
        "completed": len(turns), "failed": len(errors), "errors": errors[:3], "duration_s": round(elapsed, 6),
        "output_tokens": tokens, "output_tokens_per_s": round(tokens / elapsed, 4) if elapsed > 0 else None,
        "request_tokens_per_s": percentiles([t.completion_tokens / t.wall_time for t in turns if t.wall_time > 0]),
        "ttft_s": percentiles([t.ttft for t in turns]), "itl_s": percentiles([gap for t in turns for gap in t.itl]),
        "tau": tau, "tau_from": tau_from, "spec_counters": counters,
        "server_avg_accept_length": endpoint.server_accept_length(), "tstamp": time.time(),
    }


def sweep(run_dir: Path, endpoints: dict, names: list[str], questions: list[Question], answers: dict, config,
          levels: list[int], count_tokens, console: Console) -> list[dict]:
    """Each level, each endpoint in turn; appends to sweep.jsonl and skips endpoint × level pairs already there."""
    path = run_dir / SWEEP_FILE
    files.repair_jsonl(path)
    rows = files.read_jsonl(path)
    have = {(r["endpoint"], r["concurrency"]) for r in rows if not r.get("failed")}
    for level in levels:
        for name in names:
            if (name, level) in have:
                continue
            requests = sweep_requests(questions, answers[name], config)
            console.print(f"sweep: {name} at concurrency {level} ({len(requests)} requests)", highlight=False, soft_wrap=True)
            row = sweep_level(endpoints[name], requests, level, config, count_tokens)
            files.append_jsonl(path, row)
            rows.append(row)
            if row["failed"]:
                console.print(f"sweep: {row['failed']} of {row['requests']} requests to {name} failed at concurrency {level}: {row['errors'][0]}", highlight=False, soft_wrap=True)
    return rows
