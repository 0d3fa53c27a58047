"""The precision reference: the baseline decoded again in float32 (untimed), stored beside the run.

A bf16 verify forward over n tokens rounds differently than n one-token forwards, so bf16
decoders part from the bf16 baseline; where the fp32 baseline parts from it too, at the same
positions, it is the precision, not the decoder (the report's drift table reads both).
"""

from __future__ import annotations

from pathlib import Path

from medusa_bench.bench.answer import DecoderFacts, answer_question, answer_record, exact_match
from medusa_bench.bench.config import RunConfig
from medusa_bench.inputs.questions import Question
from medusa_bench.bench.run_folder import reference_file
from medusa_bench.decoders.base import Decoder
from medusa_bench.decoders.registry import build_decoder
from medusa_bench.results import files


class Float32Baseline:
    """The baseline's answers decoded again in float32 (untimed): the precision's noise floor.

    Same questions, both turns, the fp32 conversation carrying its own turn-1 answer. Decodes
    only; `PrecisionReference` stores.
    """

    DECODER = "baseline@float32"

    def __init__(self, loaded, config: RunConfig):
        self.run_model, self.config, self.decoder = loaded, config, None

    def load(self) -> Decoder:
        """A second, float32 copy of the model, loaded only when a question needs it."""
        from medusa_bench.models import load_model

        if self.decoder is None:
            model = load_model(self.run_model.spec, str(self.run_model.device), "float32", self.config.trust_remote_code)
            model.name = self.run_model.name
            self.decoder = build_decoder("baseline", model, self.config.options)
            self.decoder.name = self.DECODER
        return self.decoder

    @property
    def facts(self) -> DecoderFacts:
        return DecoderFacts.of(self.load())

    def record(self, question: Question, on_step=None) -> dict:
        """Both turns of `question` in float32, as an answer record (exact match filled in when stored)."""
        decoder = self.load()
        choice = answer_question(decoder, decoder.loaded, question, self.config, on_step=on_step)
        record = answer_record(question, self.DECODER, decoder, decoder.loaded, choice)
        record["model_id"] = Path(reference_file(self.run_model, "float32")).stem
        return record


class PrecisionReference:
    """The run folder's float32 baseline answers (`Float32Baseline`): appended and resumable like the answers."""

    DECODER = Float32Baseline.DECODER

    def __init__(self, run_dir: Path, loaded):
        """`loaded`: the run's model, or its name (a Ray driver loads none)."""
        self.path = Path(run_dir) / reference_file(loaded, "float32")
        files.ensure_writable_dir(self.path.parent)
        files.repair_jsonl(self.path)
        self.done = {str(r["question_id"]): r for r in files.read_jsonl(self.path)}

    def store(self, record: dict, references: dict, decoder) -> None:
        """Append one float32 answer, its exact match against the run's baseline filled in."""
        qid, choice = str(record["question_id"]), record["choices"][0]
        choice["exact_match"] = exact_match(choice, decoder, references.get("baseline", {}).get(qid), self.DECODER)
        files.append_jsonl(self.path, record)
        self.done[qid] = record
