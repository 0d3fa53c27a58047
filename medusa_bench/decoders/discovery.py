"""Finding the decoders: every module of this package, and every entry point other packages add.

Importing a decoder module registers its decoders (`registry.register`) and declares its options
(`options.declare`), so the registry and the options both ask for discovery before they answer.
Only names are imported here (importlib), so this module sits below both.
"""

from __future__ import annotations

ENTRY_POINTS = "medusa_bench.decoders"  # another package adds decoders here: name = "module"
_LOADED = False


def load_decoders() -> None:
    """Import every module of this package and every entry point in ENTRY_POINTS, once."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True  # before importing: a module that asks for the registry while loading sees it partial, not a loop
    import importlib
    import pkgutil
    from importlib.metadata import entry_points

    import medusa_bench.decoders as package

    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")
    for entry in entry_points(group=ENTRY_POINTS):
        entry.load()
