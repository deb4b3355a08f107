"""toylens: train small TransformerLens models on synthetic tasks, then take them apart."""

__version__ = "0.1.0"
