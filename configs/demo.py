"""The built-in demo: a tiny T5 1.1 on the generated multitask mixture, on CPU in minutes.

    mtjax train --config configs/demo.py            # same as plain `mtjax train`
    mtjax train --config configs/demo.py train.steps=50 --workdir /tmp/demo   # a quicker look

Expect the loss to start near 6.4 at step 1 (a little above ln 384 = 5.95, uniform over the
byte vocabulary's ids), so that the first line logged (step 10: the mean over steps 1-10) reads
about 4.1, and to fall to about 1.5 by step 200, with per-task losses for the add, copy, reverse,
sort, span-corruption and translate tasks.
"""

from mtjax.config import Config


def get_config() -> Config:
    return Config()
