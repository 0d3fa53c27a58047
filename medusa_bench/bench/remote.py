"""What the run loop asks of a decoder that runs elsewhere: `RemoteDecoder`, declared beside `Decoder`.

An in-process decoder (decoders/base.Decoder) generates token ids on the run's model and the
loop times it. A remote one, a serving endpoint (bench/endpoints.EndpointDecoder), answers a
whole question itself over HTTP and returns its own answer record, timed on its server. The
loop tells the two apart by this declared type (`isinstance(decoder, RemoteDecoder)`), never by
probing for methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

from medusa_bench.inputs.questions import Question


class RemoteDecoder(ABC):
    """A decoder of the run whose answers come from somewhere else (an OpenAI-compatible server).

    Besides `name`, `baseline_name` and `lossless` (what storing an answer reads of any decoder)
    it has `file_id` (its answer file's name: a server names its own model), answers and
    warms up by question, and describes itself for run.json. Its answers carry `device` =
    DEVICE, so the report never pairs them with answers timed on the run's own device.
    """

    DEVICE = "endpoint"
    lossless = True  # exact match against its reference is measured (greedy turns)
    name: str
    baseline_name: str
    file_id: str

    @abstractmethod
    def answer(self, question: Question, config) -> Optional[dict]:
        """Both turns of `question` as an answer record, or None when it failed (and was recorded as failed)."""

    @abstractmethod
    def warm_up(self, question: Question, config) -> None:
        """One untimed request, so the server's lazy start-up stays off the clock."""

    @abstractmethod
    def describe(self) -> dict:
        """What run.json keeps of it (`endpoints`): url, engine, version, … and `file_id`; never a key."""
