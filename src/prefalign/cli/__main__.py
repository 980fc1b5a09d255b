"""`python -m prefalign.cli …` (what `accelerate launch -m prefalign.cli train …` runs)."""

import sys

from . import main

sys.exit(main())
