"""Where the Hydra config tree lives, for a source checkout and for an installed wheel alike."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def config_dir() -> Path:
    """``toylens/configs`` inside an installed wheel, else ``configs/`` at the repo root (editable)."""
    for candidate in (_PKG / "configs", _PKG.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"toylens configs not found next to {_PKG}; reinstall toylens")
