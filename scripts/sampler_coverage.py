"""Which rows an epoch plan trains on, by length decile, and how evenly a global batch splits across processes:
this checkout's sampler against another revision's, on a recipe's own data, tokenizer and batch settings.

    python scripts/sampler_coverage.py --rev 8a35721 --output benchmarks/sampler_coverage.json

For each sampler: the share of the rows of each length decile (decile 10 = the longest tenth, by tokens over
every role) that epoch 0's plan contains, the rows it leaves out, and with ``--processes`` N the mean share of a
global batch's tokens that the first process gets (1/N when balanced). Prints JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import write_json  # noqa: E402


def sampler_at(rev: str):
    """``plan_epoch`` as revision ``rev`` wrote it (the module alone: it imports only numpy)."""
    source = subprocess.run(["git", "show", f"{rev}:embedtrain/data/sampler.py"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "sampler_at_revision.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("sampler_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module.plan_epoch


def coverage(plan, lengths: np.ndarray, processes: int) -> dict:
    seen = np.zeros(len(lengths), dtype=bool)
    first_share = []
    for batch in plan:
        rows = np.asarray(batch.rows)
        seen[rows] = True
        per = len(rows) // processes
        first_share.append(lengths[rows[:per]].sum() / lengths[rows].sum())
    edges = np.quantile(lengths, np.linspace(0, 1, 11))
    decile = np.clip(np.searchsorted(edges, lengths, side="right") - 1, 0, 9)
    return {
        "batches": len(plan),
        "rows_in_plan": int(seen.sum()),
        "rows_left_out": int((~seen).sum()),
        "share_seen_by_length_decile": [round(float(seen[decile == d].mean()), 4) for d in range(10)],
        "decile_token_ranges": [[int(edges[d]), int(edges[d + 1])] for d in range(10)],
        "first_process_token_share": round(float(np.mean(first_share)), 4),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rev", required=True, help="the revision whose sampler to compare with")
    parser.add_argument("--recipe", default="recipes/minilm/wordnet_quickstart.yaml")
    parser.add_argument("--processes", type=int, default=2, help="processes a global batch is split across")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)

    from embedtrain.config import load_recipe
    from embedtrain.data import plan_epoch, pretokenize, token_lengths
    from embedtrain.models import load_text_encoder
    from embedtrain.train.nv_embed import load_training_dataset

    recipe = load_recipe(args.recipe)
    d = recipe.data
    ds = load_training_dataset(d.train[0], 0, recipe.train.seed)
    encoder = load_text_encoder(recipe.model.name_or_path, max_length=recipe.model.max_length)
    pretokenize(ds, encoder.tokenizer, encoder.max_length_for)
    lengths = np.asarray(token_lengths(ds))
    global_batch = d.batch_size * args.processes
    report = {"recipe": args.recipe, "dataset": ds.name, "rows": len(ds), "global_batch": global_batch,
              "processes": args.processes, "window": d.length_grouping_window, "no_duplicates": d.no_duplicates,
              "seed": recipe.train.seed, "epoch": 0}
    from embedtrain.train.tasks.text import build_loss

    # this checkout lets a document repeat in a batch when the recipe's loss masks the copies (the revision cannot)
    repeat = {"repeat_documents": build_loss(recipe).masks_repeated_documents}
    report["this_checkout_repeat_documents"] = repeat["repeat_documents"]
    for name, plan_fn, extra in ((f"revision {args.rev}", sampler_at(args.rev), {}), ("this checkout", plan_epoch, repeat)):
        plan = plan_fn([len(ds)], [ds.row_keys], global_batch, recipe.train.seed, 0, lengths=[lengths.tolist()],
                       weights=[1.0], mixing=d.mixing, no_duplicates=d.no_duplicates, window=d.length_grouping_window,
                       **extra)
        report[name] = coverage(plan, lengths, args.processes)
    write_json(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
