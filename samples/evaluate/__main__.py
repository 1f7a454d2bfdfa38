"""``python -m samples.evaluate``: the same as ``guidance-evaluate`` (also under ``accelerate launch`` / ``torchrun``)."""

import sys

from samples.evaluate.command import main

sys.exit(main())
