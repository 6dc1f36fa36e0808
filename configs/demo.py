"""The built-in demo: a tiny T5 1.1 on the generated multitask mixture, on CPU in minutes.

    mtjax train --config configs/demo.py            # same as plain `mtjax train`
    mtjax train --config configs/demo.py train.steps=50 --workdir /tmp/demo   # a quicker look

Expect the loss to fall from about 5.9 (uniform over the byte vocabulary) to about 1.5 within
200 steps, with per-task losses for the add, copy, reverse, sort, span-corruption and translate
tasks.
"""

from mtjax.config import Config


def get_config() -> Config:
    return Config()
