"""python -m embedtrain (also what `accelerate launch -m embedtrain train RECIPE` runs)."""

from embedtrain.cli import run

run()
