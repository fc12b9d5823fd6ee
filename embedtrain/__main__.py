"""python -m embedtrain (also what `accelerate launch -m embedtrain train RECIPE` runs)."""

import sys

from embedtrain.cli import main

sys.exit(main())
