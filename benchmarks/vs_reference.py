"""Ours against the reference implementations, FasterDecoding/Medusa and SafeAILab/EAGLE, on the same heads and trees.

The shipped heads are converted to each reference's checkpoint layout (medusa_bench/heads/convert.py),
each reference runs in a virtual environment of its own (made once, cached: the reference's code
installed as it is, the transformers its code needs, our torch), and three long-lived workers (ours,
Medusa's, EAGLE's) decode the same MT-Bench first turns, greedy, interleaved prompt by prompt, so start-up
is never timed and drift of the shared machine hits every method alike. Per tree it prints tokens/s
of each side, ours / reference, τ (tokens per step), and whether the tokens equal each side's own
greedy baseline and each other. `--profile` then times one generation per method phase by phase.

- Medusa: our `medusa` decoder (its default `--draft-vocab` and `--draft-vocab 0`, the reference's
  drafting over the full vocabulary) against `MedusaModel.medusa_generate` on a Medusa-1 folder of the
  same heads, each tree of `--trees` passed as its `medusa_choices`; baselines: ours, and the
  reference's llm_judge/gen_model_answer_baseline.py loop.
- EAGLE: our `eagle2` against `EaModel.eagenerate` (EAGLE-1 heads, `use_eagle3=False`) on the
  reference's default dynamic tree (`total_token=60, depth=7, top_k=10`: 60 nodes over 8 levels, which
  is our `--tree` of 60 nodes and depth 8 with `--eagle-top-k 10`); baseline: its `naivegenerate`.

What the references needed to run SmolLM2 (nothing of theirs is edited; see `reference_model_folder`
and benchmarks/reference_worker.py): a model folder transformers 4.x reads (`rope_theta` at the top of
config.json, a GPT-2 tokenizer with string merges and slow-tokenizer files, a shard index for EAGLE's
embedding loader), Medusa's 5 hard-coded
Medusa-1 heads cut to the 4 the file holds, and token ids read from its per-step decode.

    .venv/bin/python benchmarks/vs_reference.py --medusa-src ../Medusa --eagle-src ../EAGLE
    .venv/bin/python benchmarks/vs_reference.py --medusa-src ../Medusa --skip-eagle --prompts 1 --max-new-tokens 16

Without `--medusa-src` / `--eagle-src` the sources are fetched with `pip download` from their
repositories at the commits below (needs network). Not part of CI; tests/test_convert.py checks the
head conversion.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from medusa_bench.errors import UserError  # noqa: E402

# The references and what their code needs. Medusa pins nothing ("transformers>=4.34"); its KV-cache
# Llama is transformers v4.34's modeling_llama with edits (the file says so), so 4.34.1. EAGLE's
# setup.py pins 4.46.2 but its requirements.txt, updated later with the code, asks >=4.53.1
# (modeling_qwen3_kv imports transformers.masking_utils, new in 4.53): 4.53.1.
REFERENCES = {
    "medusa": {"repo": "https://github.com/FasterDecoding/Medusa", "commit": "e2a5d20c048a9b0a4092e6933c34313687422518",
               "packages": ["transformers==4.34.1", "numpy<2"]},
    "eagle": {"repo": "https://github.com/SafeAILab/EAGLE", "commit": "cb7e0841fe0c206c6ed74a197ad5e2a1f13f5a2b",
              "packages": ["transformers==4.53.1", "numpy<2"]},
}
WORKER = Path(__file__).resolve().parent / "reference_worker.py"
EAGLE_DEFAULT = {"total_token": 60, "depth": 7, "top_k": 10}  # EaModel.from_pretrained's defaults
# issue #22's targets, ours (default draft vocabulary) / reference tokens/s
TARGETS = {"Medusa chain-1": 2.0, "Medusa mc_sim_7b_63": 3.0, "EAGLE-2": 3.0}


# ====================================================================== preparation (our environment)


def cache_root() -> Path:
    from medusa_bench.paths import cache_dir

    return cache_dir() / "reference"


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def reference_model_folder(loaded, root: Path) -> Path:
    """A copy of the base model folder that transformers 4.34-4.53 and tokenizers 0.14 read as it is meant.

    - config.json: transformers 5 writes `rope_parameters: {rope_theta: ...}`; 4.x reads a top-level
      `rope_theta` and, without it, silently uses 10000 (SmolLM2: 100000), so its tokens would differ.
    - tokenizer: tokenizers 0.14 reads BPE merges as "a b" strings only (0.20+ writes pairs), and
      transformers 4.x has no `TokenizersBackend` class: GPT2Tokenizer(Fast). EAGLE loads the slow
      tokenizer (`use_fast=False`), which reads vocab.json + merges.txt.
    - model.safetensors.index.json: EAGLE reads the base embeddings through a shard index only (cnets1.py
      `Model(load_emb=True)`); an index naming the one file serves it, and transformers still loads the file.
    The weights are a hard link (or copy) of ours.
    """
    source = Path(loaded.source)
    target = root / "models" / f"{loaded.name}-{digest(str(source), (source / 'model.safetensors').stat().st_size)}"
    if (target / "ready").exists():
        return target
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        os.link(source / "model.safetensors", partial / "model.safetensors")
    except OSError:
        shutil.copy2(source / "model.safetensors", partial / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(source / "model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
    (partial / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": (source / "model.safetensors").stat().st_size}, "weight_map": {n: "model.safetensors" for n in names}}))
    config = json.loads((source / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    config["rope_theta"] = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{loaded.name} uses {rope['rope_type']} rotary scaling; the reference folder writer handles the default only")
    config["torch_dtype"] = "float32"
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    if (source / "generation_config.json").exists():
        shutil.copy2(source / "generation_config.json", partial / "generation_config.json")
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    bpe = tokenizer["model"]
    if bpe.get("type") != "BPE":
        raise UserError(f"{loaded.name}'s tokenizer is {bpe.get('type')}, not byte-level BPE; the reference folder writer handles BPE only")
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    bpe["merges"] = merges
    bpe.pop("ignore_merges", None)  # unknown to tokenizers 0.14
    (partial / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (partial / "vocab.json").write_text(json.dumps(bpe["vocab"], ensure_ascii=False))
    (partial / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = loaded.tokenizer
    special = {k: getattr(tok, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if getattr(tok, k, None)}
    (partial / "special_tokens_map.json").write_text(json.dumps(special))
    (partial / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "model_max_length": loaded.context_length, **special}))
    (partial / "ready").write_text("")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def converted_heads(loaded, kind: str, model_folder: Path, root: Path) -> Path:
    """Our shipped heads of `kind` in the reference's layout (cached by the heads' bytes)."""
    from medusa_bench.heads.common import default_heads
    from medusa_bench.heads.convert import to_eagle, to_medusa1
    from medusa_bench.heads import io

    shipped = default_heads(loaded, kind)
    if shipped is None:
        raise UserError(f"no shipped {kind} heads for {loaded.name}")
    weights = sorted(p for p in shipped.iterdir() if p.suffix in (".safetensors", ".pt", ".bin"))
    key = digest(kind, str(model_folder), [io.sha256_file(p) for p in weights])
    target = root / "heads" / f"{loaded.name}-{kind}-{key}"
    if not (target / "ready").exists():
        shutil.rmtree(target, ignore_errors=True)
        (to_medusa1 if kind == "medusa" else to_eagle)(shipped, target, loaded.model, str(model_folder))
        (target / "ready").write_text("")
    return target


def reference_source(kind: str, given: str | None, root: Path) -> Path:
    """The reference's source tree: `--<kind>-src`, or its repository at the pinned commit via `pip download`."""
    if given:
        path = Path(given).expanduser().resolve()
        marker = {"medusa": "medusa/model/medusa_model.py", "eagle": "eagle/model/ea_model.py"}[kind]
        if not (path / marker).is_file():
            raise UserError(f"--{kind}-src {given} is not a checkout of {REFERENCES[kind]['repo']} (no {marker})")
        return path
    spec = REFERENCES[kind]
    target = root / "src" / f"{kind}-{spec['commit'][:7]}"
    if not (target / "ready").exists():
        download = root / "src" / f"{kind}-download"
        shutil.rmtree(download, ignore_errors=True)
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(download),
             f"git+{spec['repo']}@{spec['commit']}"], f"fetch {spec['repo']} (offline? pass --{kind}-src DIR)")
        archive = next(download.iterdir())
        shutil.rmtree(target, ignore_errors=True)
        shutil.unpack_archive(str(archive), str(target.with_name(target.name + ".unpack")))
        inner = next(target.with_name(target.name + ".unpack").iterdir())
        inner.rename(target)
        (target / "ready").write_text("")
    return target


def source_hash(path: Path) -> str:
    """sha256 over the reference's Python files and packaging: a changed checkout gets a new environment."""
    h = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if any(part in ("build", ".git") or part.endswith(".egg-info") for part in file.relative_to(path).parts):
            continue
        if file.is_file() and (file.suffix == ".py" or file.name in ("setup.py", "pyproject.toml")):
            h.update(str(file.relative_to(path)).encode())
            h.update(file.read_bytes())
    return h.hexdigest()[:12]


def reference_venv(kind: str, source: Path, torch_spec: str, root: Path) -> Path:
    """A virtual environment holding the reference (installed from `source`, no dependencies of its own
    pulled: its setup pins torch 2.0 and a web UI) plus our torch and the transformers its code needs."""
    packages = [torch_spec] + REFERENCES[kind]["packages"]
    folder = root / "venvs" / f"{kind}-{digest(packages, source_hash(source), sys.version_info[:2])}"
    python = folder / "bin" / "python"
    if (folder / "ready").exists():
        return python
    print(f"making the {kind} reference environment in {folder} (once; pip, a minute or two)", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(folder)], "make a virtual environment")
    run([str(python), "-m", "pip", "install", "-q", *packages], f"install {' '.join(packages)}")
    # from a copy: pip builds a local tree in place (build/, *.egg-info), which would change the user's checkout
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / source.name
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info"))
        run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(copy)], f"install the {kind} reference from {source}")
    (folder / "ready").write_text(json.dumps(packages))
    return python


def run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["?"]
        raise UserError(f"could not {what}: {tail[0]}")


def eagle_tree(total: int, depth: int) -> list[list[int]]:
    """A tree of `total` nodes (root included) and `depth` levels: all our dynamic EAGLE decoder reads of `--tree`."""
    paths = [[0] * d for d in range(1, depth + 1)]
    for d in range(1, depth + 1):
        for rank in range(1, 10):
            if len(paths) < total - 1:
                paths.append([0] * (d - 1) + [rank])
    if len(paths) != total - 1:
        raise UserError(f"cannot make a {total}-node tree of depth {depth}")
    return paths


# ====================================================================== workers


class Worker:
    """A long-lived process answering one JSON request per line."""

    def __init__(self, name: str, command: list[str], threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
               "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
        self.name = name
        self.log = open(cache_root() / f"{name}-worker.log", "w")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                        text=True, env=env, bufsize=1)

    def ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.log.flush()
            tail = Path(self.log.name).read_text().strip().splitlines()[-3:]
            raise UserError(f"the {self.name} worker stopped: {' | '.join(tail)} (full log: {self.log.name})")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.process.stdin.close()
            self.process.wait(timeout=30)
        except Exception:
            self.process.kill()


def our_worker() -> None:
    """Our side: the same protocol as reference_worker.py, decoding with medusa_bench's decoders."""
    from medusa_bench.bench.build import build_decoder
    from medusa_bench.decoders.options import DecoderOptions
    from medusa_bench.models import load_model

    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    decoders, loaded = {}, None
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            break
        if request["op"] == "load":
            import transformers

            loaded = load_model(request["model"], "cpu", "float32")
            for key, (name, options) in request["decoders"].items():
                decoders[key] = build_decoder(name, loaded, DecoderOptions(**options))
            reply.write(json.dumps({"ok": True, "transformers": transformers.__version__, "torch": torch.__version__,
                                    "threads": torch.get_num_threads()}) + "\n")
            continue
        decoder = decoders[request["method"]]
        phases = ours_phases(decoder, loaded) if request["op"] == "profile" else None
        try:
            start = time.perf_counter()
            result = decoder.generate(request["ids"], request["max_new_tokens"])
            wall = time.perf_counter() - start
        finally:
            if phases:
                phases.restore()
        answer = {"tokens": list(result.token_ids), "steps": result.steps, "wall": wall}
        if phases:
            answer["phases"] = {label: [phases.time[label], phases.calls[label]] for label in phases.time}
        reply.write(json.dumps(answer) + "\n")


def ours_phases(decoder, loaded):
    sys.path.insert(0, str(WORKER.parent))
    from reference_worker import Phases

    model = loaded.model
    targets = [(decoder, "step", "step (SpeculativeDecoder.step)")]
    if getattr(decoder, "proposer", None) is not None:
        targets.append((decoder.proposer, "propose", "  draft: proposer.propose"))
    targets += [(model.model, "forward", "  base body"), (model.lm_head, "forward", "  base lm_head")]
    return Phases(targets)


# ====================================================================== the run


def pick_prompts(count: int, question_file: str | None):
    """MT-Bench first turns, evenly spaced over the file (its 8 categories), and one more to warm up on."""
    from medusa_bench.inputs.questions import load_questions

    _, questions = load_questions("mt_bench", Path(question_file) if question_file else None)
    step = max(len(questions) // count, 1)
    chosen = questions[::step][:count]
    spare = next(q for q in reversed(questions) if q not in chosen)
    return chosen, spare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--medusa-src", help="a checkout of FasterDecoding/Medusa (default: pip download of commit "
                        f"{REFERENCES['medusa']['commit']})")
    parser.add_argument("--eagle-src", help=f"a checkout of SafeAILab/EAGLE (default: pip download of commit {REFERENCES['eagle']['commit']})")
    parser.add_argument("--skip-medusa", action="store_true")
    parser.add_argument("--skip-eagle", action="store_true")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=7, help="MT-Bench first turns")
    parser.add_argument("--question-file", help="MT-Bench question.jsonl (default: the bench's lookup)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--trees", default="chain-1,chain-3,mc_sim_7b_63", help="Medusa trees, comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every worker (they never run at once)")
    parser.add_argument("--torch", help="pip spec of torch for the reference environments (default: exactly ours)")
    parser.add_argument("--profile", action="store_true", help="after the timed run, time one generation per method phase by phase")
    parser.add_argument("--json", help="write every generation's record here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return our_worker()
    try:
        bench(args)
    except UserError as error:
        sys.exit(f"error: {error}")


def bench(args) -> None:
    from medusa_bench.inputs.chat import build_prompt
    from medusa_bench.models import load_model
    from medusa_bench.trees.tree import Tree

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    kinds = [k for k in ("medusa", "eagle") if not getattr(args, f"skip_{k}")]
    trees = [t.strip() for t in args.trees.split(",") if t.strip()]
    for tree in trees:
        Tree.parse(tree, num_heads=4)  # one clear line for a bad name, before anything is built

    print("preparing: the model folder and heads in the references' layouts, their environments", flush=True)
    loaded = load_model(args.model, "cpu", "float32")
    model_folder = reference_model_folder(loaded, root)
    heads = {kind: converted_heads(loaded, kind, model_folder, root) for kind in kinds}
    chosen, spare = pick_prompts(args.prompts, args.question_file)
    prompts = [(q.question_id, build_prompt(loaded, [{"role": "user", "content": q.turns[0]}])) for q in chosen]
    warm = build_prompt(loaded, [{"role": "user", "content": spare.turns[0]}])
    eos = set(loaded.eos_token_ids)
    del loaded
    torch_spec = args.torch or f"torch=={torch.__version__}"
    pythons = {kind: reference_venv(kind, reference_source(kind, getattr(args, f"{kind}_src"), root), torch_spec, root)
               for kind in kinds}

    # methods: label -> (worker, request fields); ours are keyed decoders built once in our worker
    ours_decoders, methods = {"baseline": ("baseline", {})}, {"ours baseline": ("ours", {"method": "baseline"})}
    groups = []  # (title, [(label, tree)], reference label, reference baseline label)
    if "medusa" in kinds:
        methods["Medusa ref baseline"] = ("medusa", {"method": "baseline"})
        for tree in trees:
            paths = [list(p) for p in Tree.parse(tree).paths]
            for vocab in (-1, 0):
                key = f"medusa {tree} dv{vocab}"
                ours_decoders[key] = ("medusa", {"tree": tree, "draft_vocab": vocab})
                methods[f"ours {tree}" + (" --draft-vocab 0" if vocab == 0 else "")] = ("ours", {"method": key})
            methods[f"Medusa ref {tree}"] = ("medusa", {"method": "draft", "tree": paths})
            groups.append((f"Medusa {tree}", [f"ours {tree}", f"ours {tree} --draft-vocab 0"], f"Medusa ref {tree}", "Medusa ref baseline"))
    if "eagle" in kinds:
        methods["EAGLE ref baseline"] = ("eagle", {"method": "baseline"})
        nodes, levels, top_k = EAGLE_DEFAULT["total_token"], EAGLE_DEFAULT["depth"] + 1, EAGLE_DEFAULT["top_k"]
        shape = json.dumps(eagle_tree(nodes, levels))
        for vocab in (-1, 0):
            key = f"eagle2 dv{vocab}"
            ours_decoders[key] = ("eagle2", {"tree": shape, "draft_vocab": vocab, "eagle_top_k": top_k, "eagle_depth": levels})
            methods["ours eagle2" + (" --draft-vocab 0" if vocab == 0 else "")] = ("ours", {"method": key})
        methods["EAGLE ref eagenerate"] = ("eagle", {"method": "draft"})
        groups.append((f"EAGLE-2 tree ({nodes} nodes, depth {levels}, top-k {top_k})",
                       ["ours eagle2", "ours eagle2 --draft-vocab 0"], "EAGLE ref eagenerate", "EAGLE ref baseline"))

    workers = {"ours": Worker("ours", [sys.executable, str(Path(__file__).resolve()), "--worker"], args.threads)}
    for kind in kinds:
        workers[kind] = Worker(kind, [str(pythons[kind]), str(WORKER)], args.threads)
    try:
        versions = {"ours": workers["ours"].ask({"op": "load", "model": args.model, "decoders": ours_decoders})}
        for kind in kinds:
            versions[kind] = workers[kind].ask({"op": "load", "kind": kind, "model": str(model_folder), "heads": str(heads[kind]),
                                                "src": str(reference_source(kind, getattr(args, f"{kind}_src"), root)), "eagle": EAGLE_DEFAULT})
        for name, v in versions.items():
            print(f"  {name} worker: torch {v['torch']}, transformers {v['transformers']}, {v['threads']} threads", flush=True)

        def generate(label, ids, limit, op="generate"):
            worker, fields = methods[label]
            out = workers[worker].ask({"op": op, "ids": ids, "max_new_tokens": limit, **fields})
            out["tokens"] = cut(out["tokens"], limit, eos)
            return out

        print(f"warming up every method on question {spare.question_id}", flush=True)
        for label in methods:
            generate(label, warm, min(args.max_new_tokens, 32))

        records = []
        for i, (qid, ids) in enumerate(prompts):
            order = list(methods)
            order = order[i % len(order):] + order[:i % len(order)]  # rotate who goes first
            outs = {label: generate(label, ids, args.max_new_tokens) for label in order}
            records.append({"question_id": qid, "prompt_tokens": len(ids), **{label: outs[label] for label in methods}})
            line = "  ".join(f"{label} {len(o['tokens']) / o['wall']:.1f}" for label, o in outs.items() if "baseline" in label)
            print(f"q{qid}: {len(ids)} prompt tokens; tok/s {line}", flush=True)

        report(args, records, groups, versions)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "records": records}, indent=1))
        if args.profile:
            profile(generate, prompts[0][1], args.max_new_tokens, groups)
    finally:
        for worker in workers.values():
            worker.close()


def cut(tokens: list[int], limit: int, eos: set[int]) -> list[int]:
    """Tokens as a turn ends: at the limit, and at the first EOS (kept)."""
    tokens = tokens[:limit]
    end = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
    return tokens[:end]


def totals(records, label):
    tokens = sum(len(r[label]["tokens"]) for r in records)
    wall = sum(r[label]["wall"] for r in records)
    steps = sum(r[label]["steps"] for r in records)
    return tokens / wall, tokens / max(steps, 1)


def same(records, a, b) -> str:
    return f"{sum(r[a]['tokens'] == r[b]['tokens'] for r in records)}/{len(records)}"


def report(args, records, groups, versions) -> None:
    print(f"\n{args.model}, CPU fp32, {versions['ours']['threads']} threads; {len(records)} MT-Bench first turns, "
          f"{args.max_new_tokens} new tokens, greedy; interleaved prompt by prompt in long-lived workers")
    print("tok/s: tokens / wall time of the decoding call (prefill included); τ: tokens per step (per forward after prefill)")
    print("= own base: tokens identical to that side's own greedy baseline; = ref: identical to the reference's tokens\n")
    header = f"{'tree':<44} {'method':<34} {'tok/s':>7} {'τ':>5} {'ours/ref':>8} {'= own base':>10} {'= ref':>6}"
    print(header)
    print("-" * len(header))
    for label, base in (("ours baseline", None), ("Medusa ref baseline", None), ("EAGLE ref baseline", None)):
        if label in records[0]:
            rate, tau = totals(records, label)
            ratio = f"{totals(records, 'ours baseline')[0] / rate:7.2f}x" if label != "ours baseline" else ""
            print(f"{'(none: greedy baseline)':<44} {label:<34} {rate:7.1f} {tau:5.2f} {ratio:>8} {'':>10} "
                  f"{same(records, label, 'ours baseline') if label != 'ours baseline' else '':>6}")
    for title, ours, ref, ref_base in groups:
        ref_rate, ref_tau = totals(records, ref)
        for label in ours + [ref]:
            rate, tau = totals(records, label)
            own = "ours baseline" if label in ours else ref_base
            ratio = f"{rate / ref_rate:7.2f}x" if label in ours else ""
            match = same(records, label, ref) if label in ours else ""
            print(f"{title:<44} {label:<34} {rate:7.1f} {tau:5.2f} {ratio:>8} {same(records, label, own):>10} {match:>6}")
    for title, ours, ref, _ in groups:
        target = next((v for k, v in TARGETS.items() if title.startswith(k)), None)
        if target:
            ratio = totals(records, ours[0])[0] / totals(records, ref)[0]
            print(f"target {title}: {ours[0]} / reference {ratio:.2f}x ({'ok' if ratio >= target else 'MISSED'}, target {target:.0f}x)")


def profile(generate, ids, limit, groups) -> None:
    """One generation per method with its phases timed: ms per step each (nested rows: inside the row above)."""
    print(f"\nwhere a step's time goes (one generation of {limit} tokens on the first prompt; ms per step, calls per step)")
    labels = ["ours baseline"] + [label for _, ours, ref, base in groups for label in (ours + [ref, base])]
    for label in dict.fromkeys(labels):
        out = generate(label, ids, limit, op="profile")
        steps = max(out["steps"], 1)
        print(f"{label}: {out['steps']} steps, {1000 * out['wall'] / steps:.1f} ms per step overall")
        for phase, (seconds, calls) in out["phases"].items():
            print(f"    {phase:<52} {1000 * seconds / steps:8.1f} ms  {calls / steps:5.1f}")


if __name__ == "__main__":
    main()
