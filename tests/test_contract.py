"""The drafting contract: a decoder added in one new module (here another package, found through
the `medusa_bench.decoders` entry point) needs no edit anywhere else.

The toy drafts the root again at every node of its tree (`--tree`, at most `--toy-depth` deep).
With nothing but its module it must appear with its option in `run`, `serve` and `tree --help`,
decode losslessly, resume, be refused when its option changes on resume, be sized by the tree
optimiser, and verify by `--acceptance typical` when asked (the registry sets the rule).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOY = '''
import torch

from medusa_bench.decoders.base import TreeSizing
from medusa_bench.decoders.drafting import tree_decoder
from medusa_bench.decoders.options import Option, declare, within
from medusa_bench.decoders.registry import register
from medusa_bench.decoders.spec import Draft, Proposer

declare(Option("toy_depth", 2, "Toy drafter: depth of the chain of root copies it drafts.", check=within(1, 8, integer=True)))


class RepeatRoot(Proposer):
    """Drafts the root again at every node of its tree."""

    def __init__(self, tree, device):
        self.tree, self.buffers, self.draft_size, self.device = tree, tree.buffers(device), tree.num_nodes - 1, device

    def propose(self, root, hidden, context):
        return Draft(torch.full((self.tree.num_nodes,), root, dtype=torch.long, device=self.device), self.buffers)

    def true_ranks(self, hidden, tokens, positions, depth, top_k):
        size = tokens.shape[0]
        target = positions[:, None] + torch.arange(2, depth + 2, device=tokens.device)[None]  # [T, depth]
        root = tokens[(positions + 1).clamp(max=size - 1)]  # [T]
        hit = tokens[target.clamp(max=size - 1)] == root[:, None]
        return torch.where(hit, 0, top_k).masked_fill(target >= size, -1)


@register("toy", tree=True)
def build_toy(loaded, options):
    # options.tree is a Tree (the bench sized it when it was auto); toy_depth: the deepest it drafts
    return tree_decoder("toy", loaded, options, TreeSizing(lambda t: RepeatRoot(t, loaded.device), options.toy_depth, "toy"))
'''


@pytest.fixture(scope="module")
def toy_path(tmp_path_factory) -> Path:
    """A tiny installed-looking package: toy_drafter + a dist-info naming it as a decoder entry point."""
    root = tmp_path_factory.mktemp("toy")
    (root / "toy_drafter").mkdir()
    (root / "toy_drafter" / "__init__.py").write_text(TOY)
    info = root / "toy_drafter-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-drafter\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[medusa_bench.decoders]\ntoy = toy_drafter\n")
    return root


def cli(toy_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(toy_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    result = subprocess.run([sys.executable, "-m", "medusa_bench.cli", *args], capture_output=True, text=True, env=env,
                            timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.parametrize("command", ["run", "serve", "tree"])
def test_a_new_decoders_option_appears_in_every_command(toy_path, command):
    out = cli(toy_path, command, "--help").stdout
    assert "--toy-depth" in out


def test_a_new_decoder_runs_losslessly_resumes_and_refuses_a_changed_option(toy_path, tmp_path):
    run = ("run", "--decoders", "baseline,toy", "--bench", "quick", "--limit", "2", "--max-new-tokens", "12",
           "--device", "cpu", "--dtype", "float32", "--tree", "chain-3", "--out", str(tmp_path), "--toy-depth", "3")
    cli(toy_path, *run)
    settings = json.loads((tmp_path / "run.json").read_text())["settings"]
    assert settings["toy_depth"] == 3
    answers = {}
    for file in (tmp_path / "model_answer").glob("*.jsonl"):
        answers[file.stem] = {r["question_id"]: r["choices"][0]["token_ids"] for r in map(json.loads, file.read_text().splitlines())}
    assert set(answers) == {"smollm2-135m-baseline", "smollm2-135m-toy"}
    assert answers["smollm2-135m-toy"] == answers["smollm2-135m-baseline"]  # lossless

    again = cli(toy_path, *run)
    assert "nothing to do" in again.stderr + again.stdout
    changed = cli(toy_path, *run[:-1], "2", check=False)
    assert changed.returncode == 2 and "toy_depth was 3, now 2" in changed.stderr

    bad = cli(toy_path, *run[:-1], "0", check=False)
    assert bad.returncode == 2 and "--toy-depth must be an integer from 1 to 8, got 0" in bad.stderr


def test_a_new_decoder_is_sized_by_the_tree_optimiser(toy_path, tmp_path):
    out = tmp_path / "tree.json"
    cli(toy_path, "tree", "--decoder", "toy", "--toy-depth", "3", "--prompts", "2", "--tokens", "8", "--repeats", "1",
        "--max-nodes", "4", "--refresh", "--device", "cpu", "--dtype", "float32", "--out", str(out))
    chosen = json.loads(out.read_text())
    assert (tmp_path / "calibration.json").is_file() and (tmp_path / "latency.json").is_file()
    assert chosen["tree"] is not None


def test_options_are_declared_once_and_checked(smollm):
    from medusa_bench.decoders.options import DecoderOptions, declared
    from medusa_bench.errors import UserError

    names = [o.name for o in declared()]
    assert len(names) == len(set(names))
    assert {"tree", "acceptance", "medusa_heads", "hydra_heads", "draft_vocab", "pld_tokens"} <= set(names)
    options = DecoderOptions(pld_tokens=5)
    assert options.pld_tokens == 5 and options.replace(tree="chain-2").tree == "chain-2" and options.tree == "auto"
    with pytest.raises(TypeError, match="unknown decoder option"):
        DecoderOptions(pld_token=5)
    with pytest.raises(UserError, match="unknown acceptance rule 'x'"):
        DecoderOptions(acceptance="x")
    with pytest.raises(AttributeError, match="frozen"):
        options.tree = "x"


TYPICAL = """
import json

from medusa_bench.decoders.base import Sampling
from medusa_bench.decoders.options import DecoderOptions
from medusa_bench.decoders.registry import build_decoder
from medusa_bench.inputs.chat import build_prompt
from medusa_bench.models import load_model

loaded = load_model("smollm2-135m", device="cpu", dtype="float32")
ids = build_prompt(loaded, [{"role": "user", "content": "Name three colours."}])
out = {}
for rule in ("greedy", "typical"):
    # epsilon 0: typical acceptance takes every draft the model gives any probability, the root copies included
    options = DecoderOptions(tree="chain-3", toy_depth=3, acceptance=rule, posterior_threshold=0.0)
    toy = build_decoder("toy", loaded, options)
    generation = toy.generate(ids, 24, Sampling(temperature=1.0, seed=0))
    out[rule] = {"rule": toy.acceptance.rule, "epsilon": toy.acceptance.posterior_threshold, "lossless": toy.lossless,
                 "accept_lengths": generation.accept_lengths}
print(json.dumps(out))
"""


def test_a_new_decoder_gets_typical_acceptance_without_a_line_of_its_own(toy_path):
    """The toy's factory never mentions acceptance: the registry sets --acceptance typical and its thresholds
    on the SpeculativeDecoder it returns, and the typical rule is the one its steps use."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(toy_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    result = subprocess.run([sys.executable, "-c", TYPICAL], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["greedy"]["rule"] == "greedy" and out["greedy"]["lossless"] is True
    assert out["typical"] == {**out["typical"], "rule": "typical", "epsilon": 0.0, "lossless": False}
    typical = out["typical"]["accept_lengths"]
    assert all(length == 4 for length in typical[:-1])  # root + 3 copies of it, every step: typical accepted them
    assert out["greedy"]["accept_lengths"] != typical  # sampled greedy acceptance rejects most copies
