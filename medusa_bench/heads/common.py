"""What every kind of draft heads shares: one drafting contract, fitting, locating, fingerprints, draft vocabularies.

`DraftHeads` is the base of `MedusaHeads` and `HydraHeads`, so decoders, calibration and
training call both kinds alike:

- ``num_heads``, ``hidden_size``, ``vocab_size``, ``shares_lm_head`` (each kind's own)
- ``draft_topk(x, top_k, head=None)``: top-k token ids, best first; ``head`` picks the heads
  like an index: an int (that head alone, no head dimension) or a slice (a head dimension first)
- ``restrict_draft_vocab(ids)`` / ``draft_vocab_size``: drafting among frequent tokens only
- ``check_fits(base_model)`` / ``fit_to_base(base_model)``: checked, base attached, moved
- ``fingerprint()``: sha256 of the stored weights (run.json, the tree optimiser's cache key)
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from medusa_bench.errors import UserError
from medusa_bench.heads import io
from medusa_bench.models import PACKED, pack_linears, pack_weight

PACKAGE_HEADS = Path(__file__).resolve().parents[1] / "data" / "heads"  # shipped: <model>-<kind>/
DRAFT_VOCAB_FILE = "draft_vocab.json"  # optional, beside the heads: {"token_ids": [most frequent first, ...]}

# Drafting projects every head's state onto the vocabulary; on a small model that projection is
# most of the drafting cost. On smollm2-135m (fp32, 2 CPU threads) 4 heads onto all 49152 tokens
# took 26% of a one-token forward; onto the 4096 most frequent training tokens (which held 96% of
# the drafts Hydra's heads got accepted on 10 MT-Bench questions) it is a few percent.
DEFAULT_DRAFT_VOCAB = 4096


class DraftHeads(nn.Module):
    """The part of the contract both kinds implement once, here.

    A subclass provides ``num_heads``, ``hidden_size``, ``shares_lm_head``, ``attach_base(model)``
    (which sets ``_lm_head``), ``draft_topk`` and the two draft-vocabulary hooks
    ``_vocab_weight()`` (a projection weight [..., V, H]) and ``_restricted_projection(ids)``.
    """

    kind = "draft heads"  # for messages: "Medusa heads", "Hydra heads"

    def __init__(self):
        super().__init__()
        self._draft_vocab: Tensor | None = None  # [V'] token ids drafting is restricted to (None: all)
        self._draft_proj = None  # the projection onto those ids, in the subclass's layout
        self._lm_head: Tensor | None = None  # the base lm_head weight [V, H] once attached; never registered
        # Provenance, filled by the loaders; written to run.json and used in error messages.
        self.base_model_name_or_path: str | None = None
        self.source: str | None = None  # the head file (or Medusa-2 folder) the weights came from

    @property
    def vocab_size(self) -> int | None:
        """V; for heads sharing the base lm_head known only once it is attached."""
        if not self.shares_lm_head:
            return self._vocab_weight().shape[-2]
        return None if self._lm_head is None else self._lm_head.shape[0]

    # ------------------------------------------------------------------ fitting

    def check_fits(self, base_model: nn.Module) -> None:
        """UserError unless the heads' hidden size (and own vocabulary) match ``base_model``'s.

        The heads read the base's last hidden state and end in a vocabulary projection, so the
        base lm_head's shape [V, H] is the one to match.
        """
        base_vocab, base_hidden = io.output_weight(base_model, self.kind).shape
        problems = []
        if self.hidden_size != base_hidden:
            problems.append(f"hidden size {self.hidden_size} vs the base model's {base_hidden}")
        if not self.shares_lm_head and self.vocab_size != base_vocab:
            problems.append(f"vocabulary {self.vocab_size} vs the base model's {base_vocab}")
        if problems:
            raise UserError(
                f"{self.kind} {self.source or ''} do not fit the base model {io.model_name_of(base_model) or ''}: "
                f"{'; '.join(problems)} (the heads were made for {self.base_model_name_or_path or 'an unnamed model'}); "
                "pass heads trained for this model"
            )

    def fit_to_base(self, base_model: nn.Module):
        """Check the heads fit ``base_model``, attach what they use of it, follow its dtype and device."""
        self.check_fits(base_model)
        self.attach_base(base_model)
        weight = io.output_weight(base_model, self.kind)
        heads = self.to(device=weight.device, dtype=weight.dtype)
        if getattr(weight, PACKED, None) is not None:  # the base's fp32 linears go through oneDNN (models.py): so do theirs
            pack_linears(heads)
        return heads

    # ------------------------------------------------------------------ draft vocabulary

    def restrict_draft_vocab(self, token_ids: Tensor | None) -> None:
        """Draft only among `token_ids` [V'] (say, the training data's most frequent tokens, as FR-Spec does).

        The vocab projection dominates drafting cost (4 Medusa heads x 49152 x 576 on SmolLM2
        read as much memory as a fifth of the model); a smaller one makes drafting cheaper.
        Verification is unchanged, so decoding stays lossless. None: the whole vocabulary.
        Call it after the heads are on their final device and dtype.
        """
        if token_ids is None:
            self._draft_vocab = self._draft_proj = None
            return
        full = self._vocab_weight()  # [..., V, H]
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=full.device)  # [V']
        vocab = full.shape[-2]
        if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise UserError(f"draft vocabulary ids must lie in [0, {vocab}); got {ids.numel()} ids")
        self._draft_proj = self._restricted_projection(ids)
        self._draft_vocab = ids
        if getattr(full, PACKED, None) is not None:  # the full projection goes through oneDNN (models.py): so does this one
            for weight in _matrices(self._draft_proj):
                pack_weight(weight)

    @property
    def draft_vocab_size(self) -> int | None:
        """V' when drafting is restricted, else None (the whole vocabulary)."""
        return None if self._draft_vocab is None else self._draft_vocab.numel()

    # ------------------------------------------------------------------ identity

    def fingerprint(self) -> str:
        """sha256 (hex) of the weights as stored: the head file's bytes, byte for byte.

        Heads that were never saved hash their tensors in memory.
        """
        if self.source is not None and Path(self.source).is_file():
            return io.sha256_file(Path(self.source))
        return io.sha256_tensors(self.state_dict())


def _matrices(projection) -> list[Tensor]:
    """The 2-D weights of a restricted projection: a [V', H] tensor, or per-head (weight, bias) pairs."""
    if isinstance(projection, Tensor):
        return [projection] if projection.dim() == 2 else []
    return list({id(weight): weight for weight, _ in projection}.values())  # a shared weight once


# ====================================================================== locating


def default_heads(loaded, kind: str) -> Optional[Path]:
    """Heads shipped in the package for the model (`data/heads/<loaded.name>-<kind>`), or None."""
    folder = PACKAGE_HEADS / f"{loaded.name}-{kind}"
    return folder if folder.is_dir() else None


def locate(path: str | Path, head_files: tuple[str, ...], hub_files: list[str]) -> tuple[Path, Path | None]:
    """(folder, its head file or None) for a head file, a heads folder or a Hub id.

    `head_files` are the names to look for, in preference order; from the Hub only
    `hub_files` (glob patterns) are downloaded, so heads never pull a whole model.
    """
    local = Path(path).expanduser()
    if local.is_file():
        return local.parent, local
    folder = local if local.is_dir() else io.resolve_folder(path, hub_files)
    return folder, next((folder / n for n in head_files if (folder / n).is_file()), None)


def weights_hash(path: Path) -> str | None:
    """Hex sha256 over a heads folder's weight and config files (names and bytes), or over one
    file; None when `path` is not local (a Hub id). Resume compares it to catch retrained heads."""
    path = Path(path).expanduser()
    if path.is_file():
        found = [path]
    elif path.is_dir():
        found = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in (".safetensors", ".pt", ".bin", ".json"))
    else:
        return None
    digest = hashlib.sha256()
    for file in found:
        digest.update(f"{file.name}\n{io.sha256_file(file)}\n".encode())
    return digest.hexdigest()


# ====================================================================== draft vocabularies


def read_draft_vocab(folder: str | Path | None) -> list[int] | None:
    """Token ids ordered most frequent first, from the heads folder's draft_vocab.json, if any
    (the tokens seen in the training answers; older files go on with the unseen ones in id order)."""
    if folder is None or not (Path(folder) / DRAFT_VOCAB_FILE).is_file():
        return None
    path = Path(folder) / DRAFT_VOCAB_FILE
    data = io.read_json(path)
    ids = data.get("token_ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise UserError(f"{path} is not a valid draft vocabulary (expected {{\"token_ids\": [int, ...]}}); delete it or retrain")
    return ids


def with_unlisted_ids(ids: list[int], vocab_size: int) -> list[int]:
    """`ids`, then every other id below `vocab_size` in id order. draft_vocab.json lists only the
    tokens seen in the training answers; writer (train/vocab.ranked_tokens) and reader
    (apply_draft_vocab) both go on this way, so any prefix of the full ranking reads back the same."""
    listed = set(ids)
    return ids + [token for token in range(vocab_size) if token not in listed]


def apply_draft_vocab(heads: DraftHeads, folder, size: int) -> None:
    """Restrict drafting to the heads' most frequent tokens (see DraftHeads.restrict_draft_vocab).

    size -1: the folder's draft_vocab.json, up to DEFAULT_DRAFT_VOCAB tokens, if it has one, else all tokens;
    0: the whole vocabulary; N: the N most frequent tokens (needs draft_vocab.json).
    Always sets the restriction, never leaves an earlier one: medusa2's heads are shared by
    every decoder built on one model (`LoadedModel.companions`).
    """
    if size == 0:
        heads.restrict_draft_vocab(None)
        return
    ids = read_draft_vocab(folder)
    if ids is None:
        if size > 0:
            raise UserError(f"--draft-vocab {size} needs token frequencies in {DRAFT_VOCAB_FILE} beside the heads; "
                            "heads trained by `medusa-bench train` have one; or pass --draft-vocab 0")
        heads.restrict_draft_vocab(None)
        return
    wanted = DEFAULT_DRAFT_VOCAB if size < 0 else size
    if wanted > len(ids) and heads.vocab_size:  # files list the seen tokens only
        ids = with_unlisted_ids(ids, heads.vocab_size)
    heads.restrict_draft_vocab(torch.tensor(ids[:wanted]))
