"""Split data/emoji into a training file and a held-out image-text retrieval task (fixed seed).

    python scripts/prepare_emoji.py            # writes data/emoji/train.jsonl and data/emoji/eval/

The split is by image: 80% of the emoji go to ``train.jsonl`` (one row per emoji: image path,
CLDR name, keywords, group, subgroup), the other 20% to ``eval/``, a BEIR-layout folder whose
queries are the emoji names and whose corpus rows are the images (``"image": "../images/NNNN.png"``),
one relevant image per name. The output is committed; rerunning the script reproduces it.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "data" / "emoji"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", type=Path, default=ROOT, help="the emoji folder (metadata.jsonl, images/)")
    parser.add_argument("--held-out", type=float, default=0.2, help="fraction of the emoji held out (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default 0)")
    args = parser.parse_args(argv)

    rows = [json.loads(line) for line in (args.folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    n_eval = round(args.held_out * len(rows))
    held_out = sorted(order[:n_eval])
    train = sorted(order[n_eval:])

    with (args.folder / "train.jsonl").open("w", encoding="utf-8") as f:
        for i in train:
            f.write(json.dumps(rows[i], ensure_ascii=False) + "\n")
    eval_dir = args.folder / "eval"
    eval_dir.mkdir(exist_ok=True)
    with (eval_dir / "queries.jsonl").open("w", encoding="utf-8") as q, \
            (eval_dir / "corpus.jsonl").open("w", encoding="utf-8") as c, \
            (eval_dir / "qrels.tsv").open("w", encoding="utf-8") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for i in held_out:
            stem = Path(rows[i]["image"]).stem
            q.write(json.dumps({"_id": f"name-{stem}", "text": rows[i]["name"]}, ensure_ascii=False) + "\n")
            c.write(json.dumps({"_id": f"image-{stem}", "image": f"../{rows[i]['image']}"}) + "\n")
            qrels.write(f"name-{stem}\timage-{stem}\t1\n")
    print(f"{len(train)} training emoji -> {args.folder / 'train.jsonl'}; {len(held_out)} held out -> {eval_dir}")


if __name__ == "__main__":
    main()
