"""``python -m samples.generate``: the same as ``guidance-generate``."""

import sys

from samples.generate.command import main

sys.exit(main())
