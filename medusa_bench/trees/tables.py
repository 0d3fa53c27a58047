"""The tables the tree search reads: acceptance statistics (`Calibration`) and step latencies (`Latency`),
their files, and the path probabilities they define.

Files:
  calibration.json, independent:
      {"kind": "independent", "top_k": K, "accuracy": [[p_rank0, ..., p_rank{K-1}], ...one row per depth],
       "samples": N, ...}     acc[d][r] = P(true token at depth d+1 is rank r); each row sums to <= 1
  calibration.json, conditional:
      {"kind": "conditional", "top_k": K, "paths": {"0": p, "1": p, "0,1": p, ...}, "samples": N, ...}
      "a,b,c" -> P(true token at depth 3 is rank c | the path a,b was accepted); missing paths are 0
  latency.json:
      {"device": str, "dtype": str, "context_len": int, "step_time": {"1": sec, "2": sec, ...},
       "baseline_step_time": sec (optional: the plain decoding step, default step_time at n = 1)}
Other keys are kept as metadata.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from medusa_bench.errors import UserError

Path_ = tuple[int, ...]
ProbFn = Callable[[Path_], float]  # P(path accepted), non-increasing along a path


# --- Path probabilities -------------------------------------------------------------------


def independent_prob(accuracy: Sequence[Sequence[float]]) -> ProbFn:
    """P(path) = prod_i acc[i][r_i]; 0 beyond the table's depth or top-k."""
    acc = [list(map(float, row)) for row in as_rows(accuracy)]

    def prob(path: Path_) -> float:
        p = 1.0
        for depth, rank in enumerate(path):
            if depth >= len(acc) or rank >= len(acc[depth]):
                return 0.0
            p *= acc[depth][rank]
        return p

    return prob


def conditional_prob(table: Mapping[Path_, float]) -> ProbFn:
    """P(path) = prod over its prefixes q of table[q] (q = P(last rank | prefix accepted)); missing = 0."""
    table = {tuple(k): float(v) for k, v in table.items()}

    def prob(path: Path_) -> float:
        p = 1.0
        for i in range(1, len(path) + 1):
            p *= table.get(tuple(path[:i]), 0.0)
            if p == 0.0:
                break
        return p

    return prob


def as_rows(accuracy) -> list:
    return accuracy.tolist() if hasattr(accuracy, "tolist") else list(accuracy)


def interpolate_step_time(step_time: Mapping[int, float], n: int) -> float:
    """Step time at n nodes: linear between profiled sizes, linear extrapolation outside them."""
    if not step_time:
        raise UserError("latency table is empty; profile at least one tree size")
    if n in step_time:
        return float(step_time[n])
    sizes = sorted(step_time)
    if len(sizes) == 1:
        return float(step_time[sizes[0]])
    lo_i = max(0, min(len(sizes) - 2, sum(s < n for s in sizes) - 1))
    a, b = sizes[lo_i], sizes[lo_i + 1]
    ta, tb = step_time[a], step_time[b]
    return float(ta + (tb - ta) * (n - a) / (b - a))


# --- Calibration and latency files --------------------------------------------------------


@dataclass
class Calibration:
    """Acceptance statistics of a proposer: `accuracy` (independent) or `paths` (conditional)."""

    kind: str  # "independent" | "conditional"
    top_k: int
    accuracy: list[list[float]] | None = None  # [depth][rank]
    paths: dict[Path_, float] | None = None  # path -> P(last rank | prefix accepted)
    samples: int | None = None
    meta: dict = field(default_factory=dict)
    # The rank rows it came from, per answer, in order (trees/replay.RankedAnswer), where kept: then
    # the search replays decoding on them for each candidate's τ instead of the per-position mean.
    answers: list | None = None

    @property
    def max_depth(self) -> int:
        if self.kind == "independent":
            return len(self.accuracy)
        return max((len(p) for p in self.paths), default=0)

    def prob_fn(self) -> ProbFn:
        if self.kind == "independent":
            return independent_prob(self.accuracy)
        return conditional_prob(self.paths)

    def to_json(self) -> dict:
        data = {**self.meta, "kind": self.kind, "top_k": self.top_k, "samples": self.samples}
        if self.kind == "independent":
            data["accuracy"] = self.accuracy
        else:
            data["paths"] = {",".join(map(str, p)): q for p, q in sorted(self.paths.items())}
        if self.answers:
            data["answers"] = [{"tokens": tokens, "ranks": [list(row) for row in rows]} for rows, tokens in self.answers]
        return data


@dataclass
class Latency:
    """Measured seconds per verify step by tree size n (nodes including the root)."""

    step_time: dict[int, float]
    device: str | None = None
    dtype: str | None = None
    context_len: int | None = None
    baseline_step_time: float | None = None
    meta: dict = field(default_factory=dict)

    def at(self, n: int) -> float:
        return interpolate_step_time(self.step_time, n)

    def to_json(self) -> dict:
        data = {**self.meta, "device": self.device, "dtype": self.dtype, "context_len": self.context_len}
        data["step_time"] = {str(n): t for n, t in sorted(self.step_time.items())}
        if self.baseline_step_time is not None:
            data["baseline_step_time"] = self.baseline_step_time
        return data


def load_calibration(path: str | Path) -> Calibration:
    """Read calibration.json (format in the module docstring); UserError naming the file if malformed."""
    return calibration_from_json(_read_json(path, "calibration"), source=str(path))


def save_calibration(calibration: Calibration, path: str | Path) -> Path:
    return _write_json(calibration.to_json(), path)


def load_latency(path: str | Path) -> Latency:
    """Read latency.json (format in the module docstring); UserError naming the file if malformed."""
    return latency_from_json(_read_json(path, "latency"), source=str(path))


def save_latency(latency: Latency, path: str | Path) -> Path:
    return _write_json(latency.to_json(), path)


def calibration_from_json(data, source: str = "calibration") -> Calibration:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object with 'kind', 'top_k' and 'accuracy' or 'paths'")
    kind = data.get("kind", "conditional" if "paths" in data else "independent")
    if kind not in ("independent", "conditional"):
        raise UserError(f"{source}: 'kind' must be 'independent' or 'conditional', got {kind!r}")
    top_k = data.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise UserError(f"{source}: 'top_k' must be an integer >= 1, got {top_k!r}")
    samples = data.get("samples")
    if samples is not None and (not isinstance(samples, int) or isinstance(samples, bool) or samples < 0):
        raise UserError(f"{source}: 'samples' must be a non-negative integer, got {samples!r}")
    meta = {k: v for k, v in data.items() if k not in ("kind", "top_k", "accuracy", "paths", "samples", "answers")}
    answers = _parse_answers(data.get("answers"), source)
    if kind == "independent":
        accuracy, top_k = _parse_accuracy(data, top_k, source)
        return Calibration(kind, top_k, accuracy=accuracy, samples=samples, meta=meta, answers=answers)
    paths, top_k = _parse_paths(data, top_k, source)
    return Calibration(kind, top_k, paths=paths, samples=samples, meta=meta, answers=answers)


def _parse_answers(value, source: str) -> list | None:
    """calibration.json's optional "answers": [{"tokens": A, "ranks": [[r_1 … r_d], …]}, …]."""
    if value is None:
        return None
    problem = f"{source}: 'answers' must be a list of {{\"tokens\": int, \"ranks\": [[int, …], …]}}; remove it to use the table alone"
    if not isinstance(value, list):
        raise UserError(problem)
    answers = []
    for item in value:
        rows = item.get("ranks") if isinstance(item, dict) else None
        tokens = item.get("tokens") if isinstance(item, dict) else None
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0 or not isinstance(rows, list) \
                or not all(isinstance(row, list) and all(isinstance(r, int) for r in row) for row in rows):
            raise UserError(problem)
        answers.append((rows, tokens))
    return answers


def _parse_accuracy(data: dict, top_k: int | None, source: str) -> tuple[list[list[float]], int]:
    rows = data.get("accuracy")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise UserError(f"{source}: 'accuracy' must be a non-empty list of per-depth lists of per-rank probabilities")
    top_k = len(rows[0]) if top_k is None else top_k
    out = []
    for d, row in enumerate(rows):
        if len(row) != top_k:
            raise UserError(f"{source}: accuracy row for depth {d + 1} has {len(row)} ranks, expected top_k={top_k}")
        out.append([_probability(x, f"{source}: accuracy[{d}][{r}]") for r, x in enumerate(row)])
        _check_sum(out[-1], f"{source}: accuracy for depth {d + 1}")
    return out, top_k


def _parse_paths(data: dict, top_k: int | None, source: str) -> tuple[dict[Path_, float], int]:
    raw = data.get("paths")
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{source}: 'paths' must be a non-empty object like {{\"0\": 0.6, \"0,1\": 0.2}}")
    paths: dict[Path_, float] = {}
    for key, value in raw.items():
        path = _path_key(key, source)
        paths[path] = _probability(value, f"{source}: paths[{key!r}]")
    need_k = 1 + max(p[-1] for p in paths)
    top_k = need_k if top_k is None else top_k
    if need_k > top_k:
        raise UserError(f"{source}: a path uses rank {need_k - 1} but top_k is {top_k}; fix 'top_k' or the paths")
    for path in paths:
        if len(path) > 1 and path[:-1] not in paths:
            raise UserError(f"{source}: path {_key(path)!r} lacks its prefix {_key(path[:-1])!r}; add the prefix")
    siblings: dict[Path_, list[float]] = {}
    for path, q in paths.items():
        siblings.setdefault(path[:-1], []).append(q)
    for parent, qs in siblings.items():
        _check_sum(qs, f"{source}: children of {_key(parent) or 'the root'!r}")
    return paths, top_k


def latency_from_json(data, source: str = "latency") -> Latency:
    if not isinstance(data, dict) or not isinstance(data.get("step_time"), dict) or not data["step_time"]:
        raise UserError(f"{source}: expected a JSON object with 'step_time': {{\"1\": seconds, \"2\": seconds, ...}}")
    step_time = {}
    for key, value in data["step_time"].items():
        try:
            n = int(key)
        except ValueError:
            n = 0
        if n < 1 or str(n) != str(key).strip():
            raise UserError(f"{source}: step_time key {key!r} must be a tree size (integer >= 1 nodes)")
        step_time[n] = _seconds(value, f"{source}: step_time[{key!r}]")
    baseline = data.get("baseline_step_time")
    if baseline is not None:
        baseline = _seconds(baseline, f"{source}: baseline_step_time")
    context_len = data.get("context_len")
    if context_len is not None and (not isinstance(context_len, int) or isinstance(context_len, bool)):
        raise UserError(f"{source}: 'context_len' must be an integer, got {context_len!r}")
    known = ("step_time", "device", "dtype", "context_len", "baseline_step_time")
    meta = {k: v for k, v in data.items() if k not in known}
    return Latency(step_time, data.get("device"), data.get("dtype"), context_len, baseline, meta)


def _number(x, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise UserError(f"{where} must be a finite number, got {x!r}")
    return float(x)


def _probability(x, where: str) -> float:
    x = _number(x, where)
    if not 0.0 <= x <= 1.0:
        raise UserError(f"{where} = {x} is not a probability in [0, 1]")
    return x


def _seconds(x, where: str) -> float:
    x = _number(x, where)
    if x <= 0:
        raise UserError(f"{where} = {x} must be a positive time in seconds")
    return x


def _check_sum(qs: list[float], where: str) -> None:
    total = sum(qs)
    if total > 1.0 + 1e-6:
        raise UserError(
            f"{where} sums to {total:.3f} > 1; ranks are mutually exclusive, so store per-rank "
            f"probabilities, not cumulative top-k accuracy"
        )


def _path_key(key: str, source: str) -> Path_:
    try:
        path = tuple(int(part) for part in key.split(","))
    except ValueError:
        path = ()
    if not path or min(path) < 0:
        raise UserError(f"{source}: path key {key!r} must be comma-separated ranks like \"0,1\"")
    return path


def _key(path: Path_) -> str:
    return ",".join(map(str, path))


def _read_json(path: str | Path, what: str):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist; run `medusa-bench tree` to measure it or check the path")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {what} file {path}: {e}")
    except json.JSONDecodeError as e:
        raise UserError(f"{what} file {path} is not valid JSON ({e.msg} at line {e.lineno}); fix or regenerate it")


def _write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
