"""toylens: train small TransformerLens models on synthetic tasks, then take them apart."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``toylens.load_run`` without importing torch or TransformerLens at ``import toylens``.
    if name in ("load_run", "Run"):
        from toylens.runs import run

        return getattr(run, name)
    raise AttributeError(f"module 'toylens' has no attribute {name!r}")
