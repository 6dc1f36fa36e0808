"""The T5 model: configs and sizes, NNX layers, the encoder-decoder."""

from mtjax.model.sizes import (
    MODEL_SIZES,
    T5Config,
    UnknownModelError,
    count_params,
    get_config,
    train_flops_per_step,
)
from mtjax.model.t5 import FEATURE_CONVERTER, T5

__all__ = [
    "FEATURE_CONVERTER",
    "MODEL_SIZES",
    "T5",
    "T5Config",
    "UnknownModelError",
    "count_params",
    "get_config",
    "train_flops_per_step",
]
