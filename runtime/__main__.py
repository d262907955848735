"""``python -m runtime ...``: the same as the ``runtime`` console script."""

import sys

from runtime.cli import main

sys.exit(main())
