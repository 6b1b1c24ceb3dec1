"""`python -m igea` is the `igea` command (as `accelerate launch -m igea train ...` needs)."""

import sys

from igea.cli import main

sys.exit(main())
