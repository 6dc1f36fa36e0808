"""The data layer: SeqIO tasks and mixtures -> packed host batches with per-token task ids.

Importing this package imports TensorFlow; no other mtjax package may. TensorFlow is kept off the
accelerators so that it does not reserve GPU memory that JAX needs.
"""

from mtjax.data import quiet

quiet.drop_seqio_advice()
with quiet.startup_notices_dropped():
    import tensorflow as tf

    try:  # Why: TF grabs every visible GPU on first use; the input pipeline runs on the host.
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # Devices were already initialised by someone else; nothing to do.
        pass

from mtjax.data import builtin  # noqa: E402,F401  (registers the built-in tasks and mixture)
from mtjax.data.builtin import DEFAULT_MIXTURE  # noqa: E402
from mtjax.data.mixing import (  # noqa: E402
    equal,
    examples_proportional,
    mixture_rates,
    temperature_scaled,
)
from mtjax.data.pipeline import (  # noqa: E402
    BATCH_KEYS,
    DataError,
    InputPipeline,
    TaskIdEncDecFeatureConverter,
    UnknownTaskError,
    VocabularyMismatchError,
    decode_packed_row,
    from_config,
    resolve_task_names,
)
from mtjax.data.vocab import get_vocabulary, padded_vocab_size  # noqa: E402

__all__ = [
    "BATCH_KEYS",
    "DEFAULT_MIXTURE",
    "DataError",
    "InputPipeline",
    "TaskIdEncDecFeatureConverter",
    "UnknownTaskError",
    "VocabularyMismatchError",
    "decode_packed_row",
    "from_config",
    "equal",
    "examples_proportional",
    "get_vocabulary",
    "mixture_rates",
    "padded_vocab_size",
    "resolve_task_names",
    "temperature_scaled",
]
