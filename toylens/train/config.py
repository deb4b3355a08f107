"""The training config, importable from here as the README shows; it lives in ``toylens.runs.config``
because a saved run is read back with it (analysis must not import the training code)."""

from toylens.runs.config import (  # noqa: F401  (re-exported)
    ConfigError,
    LoggerConfig,
    LoopConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    register_configs,
    resolve_device,
    validate,
)
