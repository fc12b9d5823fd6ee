"""Evaluate an embedding model with mteb; the same command as ``embedtrain eval``.

Example::

    python scripts/evaluate_mteb.py --model runs/wordnet/final --local-task data/wordnet/eval --output eval_out
"""

from embedtrain.eval.mteb_run import main

if __name__ == "__main__":
    raise SystemExit(main())
