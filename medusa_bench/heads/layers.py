"""One decoder layer of the base architecture, standing alone: Hydra++'s prefix layer, EAGLE's draft layer.

Both kinds of heads run the base model's own layer class over hidden states rather than tokens,
so the layer is built as a one-layer model of the base config whose token embedding is a stub.
"""

from __future__ import annotations

import copy

from torch import nn


def prefix_layer(base_config) -> nn.Module:
    """A one-layer model of the base architecture, fed hidden states (its token embedding is a stub).

    AutoModel builds the base's own decoder-layer class, norm and position encoding (rotary,
    learned, alibi) under the base's attribute names; the attention kernel is the first the
    architecture accepts, as for the base model.
    """
    from transformers import AutoModel

    from medusa_bench.models import ATTENTION_KERNELS, refuses_kernel

    config = copy.deepcopy(base_config)
    config.num_hidden_layers = 1
    config.vocab_size = 1  # inputs_embeds only: no [V, H] embedding table
    config.pad_token_id = None
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[-1:]
    for kernel in ATTENTION_KERNELS:
        try:
            return AutoModel.from_config(config, attn_implementation=kernel)
        except ValueError as error:
            if kernel == ATTENTION_KERNELS[-1] or not refuses_kernel(error):
                raise


def embedding_name(prefix: nn.Module) -> str:
    """The prefix layer's token-embedding weight ('embed_tokens.weight', 'wte.weight', ...): a stub, never saved."""
    embedding = prefix.get_input_embeddings()
    return next(f"{name}.weight" for name, module in prefix.named_modules() if module is embedding)
