"""The runtime under the decoders: how a base forward runs and what its KV cache keeps.

- `forward.py`: one base forward (`forward`, `model_call`), hidden states read by hooks
  (`body_and_layers`), attention layouts and the tree mask per layer type;
- `cache.py`: the static `SlotCache` and the one keep/crop API for it and for DynamicCache;
- `engine.py`: the `Engine` of a loaded model (cache kind, captured steps), `use_engine`, `engine_of`;
- `batch.py`: B rows in one forward (`forward_rows`): which cache columns each row sees (`Columns`), its masks.

It imports nothing from the decoders, heads, bench, serve, train or judge above it.
"""
