"""Small multimodal fixtures: image-text rows written on the fly from the emoji images in data/emoji."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO

EMOJI = REPO / "data" / "emoji"


def emoji_rows(n: int, start: int = 0) -> list[dict]:
    lines = (EMOJI / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[start : start + n]]


def write_image_text_rows(folder: Path, n: int = 24, start: int = 0, broken: dict[int, str] | None = None) -> Path:
    """``folder/train.jsonl`` with n emoji rows (image copied into ``folder/images``), and optional broken rows:
    ``{row_index: "missing" | "garbage"}`` points a row at a missing file or a file that is not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    broken = broken or {}
    with (folder / "train.jsonl").open("w", encoding="utf-8") as f:
        for i, row in enumerate(emoji_rows(n, start)):
            name = Path(row["image"]).name
            if broken.get(i) == "missing":
                row["image"] = f"images/missing-{name}"
            elif broken.get(i) == "garbage":
                (folder / "images" / f"garbage-{name}").write_bytes(b"this is not a png")
                row["image"] = f"images/garbage-{name}"
            else:
                shutil.copy(EMOJI / row["image"], folder / "images" / name)
                row["image"] = f"images/{name}"
            f.write(json.dumps(row) + "\n")
    return folder / "train.jsonl"


def write_image_text_task(folder: Path, n: int = 12, start: int = 100) -> Path:
    """A BEIR folder: emoji names as queries, their images as the corpus (one relevant image each)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = emoji_rows(n, start)
    with (folder / "queries.jsonl").open("w") as q, (folder / "corpus.jsonl").open("w") as c, \
            (folder / "qrels.tsv").open("w") as qrels:
        qrels.write("query-id\tcorpus-id\tscore\n")
        for i, row in enumerate(rows):
            q.write(json.dumps({"_id": f"q{i}", "text": row["name"]}) + "\n")
            c.write(json.dumps({"_id": f"d{i}", "image": str(EMOJI / row["image"])}) + "\n")
            qrels.write(f"q{i}\td{i}\t1\n")
    return folder


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL with a locally built processor (see embedtrain.models.tiny_vlm)."""
    from embedtrain.models.tiny_vlm import build_tiny_qwen2_vl

    texts = [r["name"] for r in emoji_rows(200)]
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"), texts=texts)


def write_image_text_shards(folder: Path, jsonl: Path, rows_per_shard: int = 4) -> Path:
    """Webdataset shards ``folder/train-NNNNN.tar`` of a JSONL written by :func:`write_image_text_rows` (with
    scripts/make_webdataset.py): ``<key>.png``, ``<key>.txt`` (the name) and ``<key>.json`` (the other fields)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_webdataset", REPO / "scripts" / "make_webdataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    module.write_shards(rows, folder, "name", "image", jsonl.parent, rows_per_shard)
    return folder
