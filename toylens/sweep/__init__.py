"""Sweeps: many runs from one ``toylens-train -m`` command, on any Hydra launcher, and the report across them."""
