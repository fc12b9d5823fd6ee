"""Convert MMEB-train (VLM2Vec's training data) into files that recipes/qwen2-vl-2b/vlm2vec.yaml reads.

    hf download TIGER-Lab/MMEB-train --repo-type dataset --local-dir ~/data/MMEB-train
    (unzip its images so that the rows' image paths resolve under --images)
    python scripts/prepare_mmeb.py --mmeb-train ~/data/MMEB-train --images ~/data/MMEB-train --output data/mmeb

MMEB-train has one folder per subset (ImageNet_1K, MSCOCO_t2i, ...) of parquet or JSON-lines files
with the columns ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path`` (and negatives, which
VLM2Vec does not use). Texts mark their image with ``<|image_1|>`` (Phi-3.5-V's token). Each subset
becomes ``<output>/<subset>.jsonl`` with ``query_text``, ``query_image``, ``positive_text`` and
``positive_image`` (absolute paths): the marker is removed from the text, and the recipe's template
``{image}{text}`` puts the model's own image token where it was (VLM2Vec puts Qwen2-VL's
``<|vision_start|><|image_pad|><|vision_end|>`` there the same way). A role's image column is only
written when the subset has images for that role; rows that mix the two are written to
``<subset>-<kind>.jsonl`` files, one per combination. ``<output>/datasets.yaml`` lists the
``data.train`` entries for what was found.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

MARKER = "<|image_1|>"
SPLITS = ("original", "diverse_instruction")
ROLES = {"query": ("qry", "qry_image_path"), "positive": ("pos_text", "pos_image_path")}


def _files(folder: Path, split: str) -> list[Path]:
    found = sorted(p for p in folder.rglob("*") if p.suffix in {".parquet", ".jsonl", ".json"})
    chosen = [p for p in found if p.name.startswith(split) or p.parent.name == split]
    return chosen or [p for p in found if not any(p.name.startswith(s) for s in SPLITS)]


def _rows(files: list[Path]):
    import datasets

    by_kind: dict[str, list[Path]] = {}
    for f in files:
        by_kind.setdefault("parquet" if f.suffix == ".parquet" else "json", []).append(f)
    for kind, paths in by_kind.items():
        yield from datasets.load_dataset(kind, data_files=[str(p) for p in paths], split="train")


def _clean(text) -> str:
    text = "" if text is None else str(text)
    return text.replace(MARKER, "", 1) if text.startswith(MARKER) else text.replace(MARKER, "")


def convert_subset(folder: Path, images: Path, output: Path, split: str, max_rows: int | None) -> list[dict]:
    """Write the subset's rows; returns a data.train entry per file written."""
    files = _files(folder, split)
    if not files:
        raise SystemExit(f"error: {folder}: no .parquet/.jsonl files; point --mmeb-train at MMEB-train's folder")
    groups: dict[tuple[bool, bool], list[dict]] = {}
    dropped = 0
    for row in _rows(files):
        out = {}
        for role, (text_col, image_col) in ROLES.items():
            image = row.get(image_col) or ""
            out[f"{role}_text"] = _clean(row.get(text_col))
            if image:
                out[f"{role}_image"] = str(images / image)
        if not (out["query_text"].strip() or "query_image" in out) or \
                not (out["positive_text"].strip() or "positive_image" in out):
            dropped += 1
            continue
        group = groups.setdefault(("query_image" in out, "positive_image" in out), [])
        if max_rows is None or len(group) < max_rows:
            group.append(out)
    entries = []
    for (q_image, p_image), rows in sorted(groups.items()):
        suffix = "" if len(groups) == 1 else f"-{'i' if q_image else ''}t2{'i' if p_image else ''}t"
        name = f"{folder.name}{suffix}"
        path = output / f"{name}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        entry = {"path": str(path), "name": name, "query_text_column": "query_text",
                 "positive_text_column": "positive_text"}
        if q_image:
            entry["query_image_column"] = "query_image"
        if p_image:
            entry["positive_image_column"] = "positive_image"
        entries.append(entry)
        print(f"{name}: {len(rows)} rows -> {path}")
    if dropped:
        print(f"{folder.name}: {dropped} rows without a query or a positive left out", file=sys.stderr)
    return entries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Convert MMEB-train for recipes/qwen2-vl-2b/vlm2vec.yaml.")
    parser.add_argument("--mmeb-train", type=Path, required=True, help="MMEB-train folder (one folder per subset)")
    parser.add_argument("--images", type=Path, required=True, help="folder the rows' image paths are relative to")
    parser.add_argument("--output", type=Path, default=Path("data/mmeb"), help="where the .jsonl files go")
    parser.add_argument("--split", choices=SPLITS, default="original",
                        help="instructions as in the paper (original) or paraphrased (diverse_instruction)")
    parser.add_argument("--subsets", nargs="+", help="only these subsets (default: every folder)")
    parser.add_argument("--max-rows", type=int, default=50000, help="rows kept per subset (VLM2Vec: 50,000)")
    args = parser.parse_args(argv)

    if not args.mmeb_train.is_dir():
        print(f"error: --mmeb-train {args.mmeb_train}: no such folder", file=sys.stderr)
        return 2
    folders = sorted(p for p in args.mmeb_train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if args.subsets:
        missing = sorted(set(args.subsets) - {p.name for p in folders})
        if missing:
            print(f"error: --subsets: not in {args.mmeb_train}: {', '.join(missing)}", file=sys.stderr)
            return 2
        folders = [p for p in folders if p.name in args.subsets]
    folders = [p for p in folders if _files(p, args.split)]
    args.output.mkdir(parents=True, exist_ok=True)
    entries = []
    for folder in folders:
        entries += convert_subset(folder, args.images.resolve(), args.output, args.split, args.max_rows)
    (args.output / "datasets.yaml").write_text(yaml.safe_dump({"train": entries}, sort_keys=False), encoding="utf-8")
    print(f"{len(entries)} datasets; data.train entries in {args.output / 'datasets.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
