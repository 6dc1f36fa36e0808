"""The built-in demo: a tiny T5 1.1 on the generated multitask mixture, on CPU in minutes.

    mtjax train --config configs/demo.py            # same as plain `mtjax train`
    mtjax train --config configs/demo.py train.steps=50 --workdir /tmp/demo   # a quicker look



"""

from mtjax.config import Config


def get_config() -> Config:
    return Config()
