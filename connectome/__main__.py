"""``python -m connectome``: the command line (also under ``torchrun``)."""

import sys

from connectome.cli import main

sys.exit(main())
