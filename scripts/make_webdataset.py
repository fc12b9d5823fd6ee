"""Write image-text rows of a JSONL file as webdataset shards (``.tar`` files), byte for byte reproducibly.

    python scripts/make_webdataset.py data/emoji/train.jsonl data/emoji_wds --text-column name \\
        --image-column image --rows-per-shard 256      # data/emoji_wds/train-00000.tar ... train-00005.tar

Each row becomes one sample: ``<key>.<ext>`` (the image file's bytes, ``ext`` its suffix: ``png``),
``<key>.txt`` (the text column) and ``<key>.json`` (the row's other fields, so that a recipe may also
read ``json.<field>``). The key is the row's 0-based index in the JSONL, zero-padded, so that shard
order and member order are the file's row order: a recipe reading the shards sees the rows in the
order it sees the JSONL. Members carry no time stamp, owner or permissions of the machine (mtime 0,
uid/gid 0, mode 0644), so the same input gives the same shards. Shards named ``<prefix>-*.tar`` already
in the output folder are removed first (a shorter set must not leave old shards to be read).
Relative image paths are read from ``--image-root`` (default: the JSONL file's folder). Prints a JSON
summary (shards, rows, bytes, SHA-256 of each shard).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from embedtrain.errors import EmbedtrainError, print_error  # noqa: E402


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shards(
    rows: list[dict],
    output: Path,
    text_column: str,
    image_column: str,
    image_root: Path,
    rows_per_shard: int = 256,
    prefix: str = "train",
    source: str = "the rows",
) -> list[Path]:
    """Write ``rows`` as shards ``output/<prefix>-NNNNN.tar``; returns the shard paths in order."""
    if rows_per_shard < 1:
        raise EmbedtrainError(f"--rows-per-shard: must be at least 1, got {rows_per_shard}")
    if not rows:
        raise EmbedtrainError(f"{source}: no rows to write")
    width = max(6, len(str(len(rows) - 1)))
    samples = []
    suffixes = set()
    for i, row in enumerate(rows):
        where = f"{source} row {i + 1}"
        for column in (text_column, image_column):
            if column not in row:
                raise EmbedtrainError(f"{where}: no column '{column}' (have: {', '.join(row)})")
        text, image = row[text_column], row[image_column]
        if not isinstance(text, str) or not isinstance(image, str):
            raise EmbedtrainError(f"{where}: '{text_column}' must be a text and '{image_column}' an image path")
        path = Path(image) if Path(image).is_absolute() else image_root / image
        if not path.is_file():
            raise EmbedtrainError(f"{where}: image {path} not found; check --image-root")
        suffix = path.suffix.lower().lstrip(".")
        if not suffix:
            raise EmbedtrainError(f"{where}: image {path} has no file suffix to name its member by")
        suffixes.add(suffix)
        rest = {k: v for k, v in row.items() if k not in (text_column, image_column)}
        samples.append((f"{i:0{width}d}", suffix, path, text, rest))
    if len(suffixes) > 1:
        # a sample's members become columns named by extension: one image column needs one extension
        raise EmbedtrainError(f"{source}: images of several formats ({', '.join(sorted(suffixes))}); "
                              "convert them to one format first")

    output.mkdir(parents=True, exist_ok=True)
    for old in sorted(output.glob(f"{prefix}-*.tar")):
        old.unlink()
    shards = []
    for start in range(0, len(samples), rows_per_shard):
        shard = output / f"{prefix}-{start // rows_per_shard:05d}.tar"
        with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, suffix, path, text, rest in samples[start : start + rows_per_shard]:
                _member(tar, f"{key}.{suffix}", path.read_bytes())
                _member(tar, f"{key}.txt", text.encode("utf-8"))
                if rest:
                    _member(tar, f"{key}.json", json.dumps(rest, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        shards.append(shard)
    return shards


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("jsonl", type=Path, help="the rows: one JSON object a line")
    parser.add_argument("output", type=Path, help="the folder to write the shards to")
    parser.add_argument("--text-column", default="name", help="the column written as <key>.txt (default: name)")
    parser.add_argument("--image-column", default="image", help="the image path column (default: image)")
    parser.add_argument("--image-root", type=Path, default=None,
                        help="folder of relative image paths (default: the JSONL file's folder)")
    parser.add_argument("--rows-per-shard", type=int, default=256, help="samples per shard (default: 256)")
    parser.add_argument("--prefix", default="train", help="shard names: <prefix>-00000.tar, ... (default: train)")
    args = parser.parse_args(argv)
    try:
        if not args.jsonl.is_file():
            raise EmbedtrainError(f"{args.jsonl}: file not found")
        rows = []
        for n, line in enumerate(args.jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise EmbedtrainError(f"{args.jsonl} line {n}: not JSON ({err.msg})") from None
        shards = write_shards(rows, args.output, args.text_column, args.image_column,
                              args.image_root or args.jsonl.parent, args.rows_per_shard, args.prefix, str(args.jsonl))
    except EmbedtrainError as err:
        return print_error(err)
    summary = {
        "source": str(args.jsonl), "rows": len(rows), "rows_per_shard": args.rows_per_shard, "shards": len(shards),
        "bytes": sum(s.stat().st_size for s in shards),
        "sha256": {s.name: hashlib.sha256(s.read_bytes()).hexdigest() for s in shards},
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
