"""The reference implementations' side of benchmarks/vs_reference.py: runs inside their own virtual environment.

Standard library + torch + the reference package only (never medusa_bench: its transformers is
not this one). One process per reference, long-lived: it loads the model once, then answers
JSON requests line by line on stdin, one JSON answer per line on its original stdout (library
prints go to stderr). Requests:

    {"op": "load", "kind": "medusa" | "eagle", "model": DIR, "heads": DIR, "src": DIR, "eagle": {...}}
    {"op": "generate", "method": "draft" | "baseline", "ids": [...], "max_new_tokens": N, "tree": [[0], ...]}
    {"op": "profile", ... as generate}: the same, with the time of each phase of a step
    {"op": "quit"}

What runs is the reference's own code, unmodified (see `load_medusa` / `load_eagle` for the
two things this file does around it, and why).
"""

from __future__ import annotations

import ast
import json
import os
import sys
import time
from collections import defaultdict

import torch


class Recorder:
    """The reference Medusa's tokenizer, also keeping the ids it is asked to decode.

    `medusa_generate` decodes its whole output to text after every step and yields only that
    text; this wrapper lets the caller read the token ids from the same call (and stop at the
    token limit, which `medusa_generate` has no argument for), still paying for the decode.
    """

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []

    def decode(self, ids, *args, **kwargs):
        self.ids = ids.tolist()
        return self.tokenizer.decode(ids, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def source_function(path: str, name: str, namespace: dict):
    """The function `name` of the file at `path`, as written there, defined in `namespace`.

    The reference's greedy baseline lives in a script (llm_judge/gen_model_answer_baseline.py)
    whose imports (fastchat, shortuuid, ray) serve its answer files, not decoding: only the
    function's own source is run, with the names it uses from medusa.model.* in `namespace`.
    """
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module([node], type_ignores=[]), path, "exec"), namespace)
    return namespace[name]


def check_loaded(module: torch.nn.Module, tensors: dict, prefix: str = "") -> None:
    """The reference loads heads with strict=False, which ignores any key it does not expect: check every tensor landed."""
    state = module.state_dict()
    for key, value in tensors.items():
        own = state.get(prefix + key)
        if own is None or own.shape != value.shape or not torch.equal(own.float(), value.float()):
            raise SystemExit(f"the reference did not load {key!r} from the converted heads")


class MedusaSide:
    """FasterDecoding/Medusa: `MedusaModel.from_pretrained` on a Medusa-1 folder, `medusa_generate` to decode."""

    def __init__(self, request):
        from medusa.model import medusa_model as module
        from medusa.model import kv_cache, utils

        self.module = module
        model = module.MedusaModel.from_pretrained(request["heads"], torch_dtype=torch.float32)
        # Its Medusa-1 loader builds 5 heads whatever the folder's config says ("TODO: fix the uploaded
        # config", medusa_model.py) and loads the file with strict=False: our 4 load, a 5th stays random
        # and would be computed every step. Keep the heads the file holds.
        tensors = torch.load(os.path.join(request["heads"], "medusa_lm_head.pt"), map_location="cpu")
        count = 1 + max(int(key.split(".")[0]) for key in tensors)
        check_loaded(model.medusa_head, tensors)
        model.medusa_head = model.medusa_head[:count]
        model.medusa = count
        self.model = model.eval()
        self.recorder = Recorder(model.tokenizer)
        model.tokenizer = self.recorder
        namespace = {"torch": torch, **{k: v for k, v in vars(utils).items() if not k.startswith("__")},
                     "initialize_past_key_values": kv_cache.initialize_past_key_values}
        baseline_file = os.path.join(request["src"], "llm_judge", "gen_model_answer_baseline.py")
        self.baseline_forward = source_function(baseline_file, "medusa_forward", namespace)
        self.phases = [(module, "generate_candidates", "draft: top-k of the heads' logits (generate_candidates)"),
                       (module, "tree_decoding", "verify: tree_decoding (forward, heads, per-path gathers)"),
                       (model.model, "forward", "  base body"),
                       (model.lm_head, "forward", "  base lm_head")]
        self.phases += [(head, "forward", "  Medusa heads, every node, full vocabulary") for head in model.medusa_head]
        self.phases += [(module, "evaluate_posterior", "accept: evaluate_posterior"),
                        (module, "update_inference_inputs", "keep: update_inference_inputs")]

    def draft(self, ids, limit, tree):
        """`medusa_generate` (greedy: temperature 0), stopped once it has emitted `limit` tokens."""
        self.recorder.ids = []
        steps = 0
        start = time.perf_counter()
        for _ in self.model.medusa_generate(ids, temperature=0.0, medusa_choices=tree, max_steps=limit):
            steps += 1
            if len(self.recorder.ids) >= limit:
                break
        wall = time.perf_counter() - start
        return self.recorder.ids, steps, wall

    def baseline(self, ids, limit):
        """The reference's greedy baseline (its own KV cache, one token per forward), `limit` steps."""
        start = time.perf_counter()
        out, _, idx = self.baseline_forward(ids, self.model, self.recorder.tokenizer, [[0]], 0.0, 0.09, 0.3, max_steps=limit)
        wall = time.perf_counter() - start
        return out[0, ids.shape[1]:].tolist(), idx + 1, wall


class EagleSide:
    """SafeAILab/EAGLE: `EaModel.from_pretrained(use_eagle3=False)` on EAGLE-1 heads, `eagenerate` to decode."""

    def __init__(self, request):
        from eagle.model import ea_model as module

        options = request["eagle"]
        model = module.EaModel.from_pretrained(
            use_eagle3=False, base_model_path=request["model"], ea_model_path=request["heads"],
            total_token=options["total_token"], depth=options["depth"], top_k=options["top_k"], torch_dtype=torch.float32)
        from safetensors.torch import load_file

        check_loaded(model.ea_layer, load_file(os.path.join(request["heads"], "model.safetensors")))
        self.model = model.eval()
        self.phases = [(model.ea_layer, "topK_genrate", "draft: topK_genrate (in update_inference_inputs)"),
                       (model.ea_layer, "forward", "  draft layer forwards"),
                       (module, "tree_decoding", "verify: tree_decoding"),
                       (model.base_model.model, "forward", "  base body"),
                       (model.base_model.lm_head, "forward", "base lm_head (verify 1 + draft levels)"),
                       (module, "evaluate_posterior", "accept: evaluate_posterior"),
                       (module, "update_inference_inputs", "keep + next draft: update_inference_inputs")]

    def draft(self, ids, limit, tree):
        """`eagenerate` (greedy), which stops once it has emitted more than max_new_tokens: limit - 1."""
        start = time.perf_counter()
        out, _, idx = self.model.eagenerate(ids, temperature=0.0, max_new_tokens=limit - 1, log=True)
        wall = time.perf_counter() - start
        return out[0, ids.shape[1]:].tolist(), idx + 1, wall

    def baseline(self, ids, limit):
        """`naivegenerate`: EAGLE's own greedy baseline on the same KV-cache model."""
        start = time.perf_counter()
        out, _, idx = self.model.naivegenerate(ids, temperature=0.0, max_new_tokens=limit - 1, log=True)
        wall = time.perf_counter() - start
        return out[0, ids.shape[1]:].tolist(), idx + 1, wall


class Phases:
    """Wall time spent inside each wrapped callable during one generation (profile requests only)."""

    def __init__(self, targets):
        self.time, self.calls, self.undo = defaultdict(float), defaultdict(int), []
        for owner, attr, label in targets:
            self.time[label] += 0.0  # report in the targets' order: nested rows (indented) under their parent
            self.wrap(owner, attr, label)

    def wrap(self, owner, attr, label):
        original = getattr(owner, attr)
        self.undo.append((owner, attr, original if attr in vars(owner) else None))  # None: a class attribute
        tally = self

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                tally.time[label] += time.perf_counter() - start
                tally.calls[label] += 1

        setattr(owner, attr, timed)

    def restore(self):
        for owner, attr, original in reversed(self.undo):
            if original is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)


def answer(side, request):
    ids = torch.tensor([request["ids"]], dtype=torch.long)
    limit = request["max_new_tokens"]
    run = (lambda: side.baseline(ids, limit)) if request["method"] == "baseline" else (lambda: side.draft(ids, limit, request.get("tree")))
    if request["op"] != "profile":
        with torch.inference_mode():
            tokens, steps, wall = run()
        return {"tokens": tokens, "steps": steps, "wall": wall}
    phases = Phases(side.phases)
    try:
        with torch.inference_mode():
            tokens, steps, wall = run()
    finally:
        phases.restore()
    return {"tokens": tokens, "steps": steps, "wall": wall,
            "phases": {label: [phases.time[label], phases.calls[label]] for label in phases.time}}


def main() -> None:
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the reference's own prints must not mix with the answers
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    side = None
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            break
        if request["op"] == "load":
            import transformers

            side = (MedusaSide if request["kind"] == "medusa" else EagleSide)(request)
            reply.write(json.dumps({"ok": True, "transformers": transformers.__version__, "torch": torch.__version__,
                                    "threads": torch.get_num_threads()}) + "\n")
            continue
        reply.write(json.dumps(answer(side, request)) + "\n")


if __name__ == "__main__":
    main()
