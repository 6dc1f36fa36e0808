"""`python -m mtjax` is the `mtjax` command."""

import sys

from mtjax.cli import main

sys.exit(main())
