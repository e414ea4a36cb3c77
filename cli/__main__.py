"""`python -m soundstorm.cli ...` runs the `soundstorm` command (e.g. under torchrun)."""

import sys

from soundstorm.cli import main

sys.exit(main())
