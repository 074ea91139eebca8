"""`python -m labeling.cli ...` (and `accelerate launch -m labeling.cli ...`) is the `prefloop` command."""

import sys

from labeling.cli import main

sys.exit(main())
