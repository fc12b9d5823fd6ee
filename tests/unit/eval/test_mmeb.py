"""MMEB evaluation from local MMEB-format data: precision@1 against each query's candidate set, category averages,
one-line data errors, and tiny CLIP / VLM2Vec folders end to end through ``embedtrain eval --mmeb``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from embedtrain.cli import main as cli
from embedtrain.errors import EmbedtrainError
from embedtrain.eval.mmeb import Item, encode_items, evaluate_task, load_mmeb_task, precision_at_1

from multimodal_support import tiny_vlm  # noqa: F401  (fixture)

MARK = "<|image_1|>"
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30),
          "red2": (180, 20, 60)}


def write_images(folder: Path) -> Path:
    """Small solid-colour PNGs ``<folder>/images/<colour>.png`` (56 px: a multiple of Qwen2-VL's 28 px patches)."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name, rgb in COLORS.items():
        Image.new("RGB", (56, 56), rgb).save(folder / "images" / f"{name}.png")
    return folder


def row(query_text: str, query_image: str, targets: list[tuple[str, str]]) -> dict:
    return {"qry_text": query_text, "qry_img_path": query_image,
            "tgt_text": [t for t, _ in targets], "tgt_img_path": [i for _, i in targets]}


def write_task(root: Path, name: str, rows: list[dict], fmt: str = "jsonl") -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), folder / "test-00000-of-00001.parquet")
        return folder / "test-00000-of-00001.parquet"
    path = folder / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CLASSIFY = f"{MARK} Represent the given image for classification"
CLASSIFICATION_ROWS = [  # query image, candidate labels (the positive first)
    row(CLASSIFY, "images/red.png", [("red", ""), ("green", ""), ("blue", "")]),
    row(CLASSIFY, "images/green.png", [("green", ""), ("red", ""), ("blue", "")]),
    row(CLASSIFY, "images/blue.png", [("blue", ""), ("red", ""), ("green", "")]),
    row(CLASSIFY, "images/yellow.png", [("yellow", ""), ("red", ""), ("green", "")]),
    row(CLASSIFY, "images/red2.png", [("red", ""), ("blue", ""), ("green", "")]),
]


class FixedEncoder:
    """Embeds an item with an image by its file's stem, a text-only item by its text: every ranking is known."""

    def __init__(self, images: dict[str, list[float]], texts: dict[str, list[float]], kind: str = "vlm2vec"):
        self.images = {k: torch.tensor(v, dtype=torch.float32) for k, v in images.items()}
        self.texts = {k: torch.tensor(v, dtype=torch.float32) for k, v in texts.items()}
        self.kind = kind
        self.calls: list[tuple[str, list, list]] = []

    def encode_items(self, texts=None, images=None, role="document", **_):
        self.calls.append((role, texts, images))
        if images is None:
            return torch.stack([self.texts[t] for t in texts])
        if self.kind == "clip" and texts is not None:
            raise AssertionError("a CLIP input is a text or an image")
        return torch.stack([self.images[Path(p).stem] for p in images])


def test_precision_at_1_equals_the_hand_computed_value(tmp_path: Path) -> None:
    write_task(write_images(tmp_path), "ImageNet-1K", CLASSIFICATION_ROWS)
    task = load_mmeb_task(tmp_path / "ImageNet-1K", tmp_path)
    assert task.category == "classification"
    assert [t.text for t in task.targets] == ["red", "green", "blue", "yellow"]  # each candidate embedded once
    labels = {"red": [1, 0, 0], "green": [0, 1, 0], "blue": [0, 0, 1], "yellow": [1, 0, 0]}  # yellow ties red
    images = {
        "red": [1, 0, 0],  # -> red, the positive: right
        "green": [0.9, 0.1, 0],  # -> red before green: wrong
        "blue": [0, 0, 1],  # -> blue: right
        "yellow": [2, 0, 0],  # yellow and red tie; the first candidate (the positive) wins: right
        "red2": [0, 1, 0.2],  # -> green before red: wrong
    }
    encoder = FixedEncoder(images, labels)
    assert evaluate_task(encoder, task, batch_size=2) == pytest.approx(3 / 5)
    roles = [(role, texts) for role, texts, _ in encoder.calls]
    assert roles == [("query", [" Represent the given image for classification"] * 5),  # marker removed
                     ("document", ["red", "green", "blue", "yellow"])]


def test_precision_at_1_ties_and_shapes() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    # query 0: candidates 1 and 0 tie (cosine 1), the first (1, the positive) wins; query 1: candidate 0 loses to 2
    assert precision_at_1(q, t, [[1, 0], [0, 2]]) == 0.5


def test_clip_items_with_image_and_text_are_the_sum_of_both(tmp_path: Path) -> None:
    write_images(tmp_path)
    items = [Item("what colour", str(tmp_path / "images" / "red.png")), Item("a", None),
             Item("", str(tmp_path / "images" / "blue.png"))]
    encoder = FixedEncoder({"red": [1, 0], "blue": [0, 2]}, {"what colour": [0, 1], "a": [3, 4]}, kind="clip")
    out = encode_items(encoder, items, "query", batch_size=4, desc="")
    torch.testing.assert_close(out, torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)], [3.0, 4.0], [0.0, 2.0]]))


def test_data_problems_are_one_line_naming_file_and_row(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_images(tmp_path / "mmeb")
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--mmeb", str(root), "--output", str(tmp_path / "out")]

    path = write_task(root, "ImageNet-1K", [CLASSIFICATION_ROWS[0], row(CLASSIFY, "images/none.png", [("red", "")])])
    assert cli(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {path}:2: image images/none.png not found under {root}; unzip MMEB-eval's images there or point "
        "--mmeb-images at the folder the rows' paths are relative to")

    path = write_task(root, "ImageNet-1K", [{**CLASSIFICATION_ROWS[0], "tgt_img_path": [""]}])
    assert cli(argv) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {path}:1: tgt_text has 3 candidates and tgt_img_path 1; give one (text, image) pair per "
        "candidate, the positive first")

    rows = [{k: v for k, v in r.items() if k != "qry_img_path"} for r in CLASSIFICATION_ROWS]
    path = write_task(root, "ImageNet-1K", rows, fmt="parquet")
    (root / "ImageNet-1K" / "test.jsonl").unlink()
    assert cli(argv) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {path}: missing column(s) qry_img_path (have: ")

    assert cli([*argv, "--mmeb-tasks", "ImageNet1K"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --mmeb-tasks: no task folder 'ImageNet1K' in {root} (did you mean 'ImageNet-1K'?)")
    assert "\n" not in err

    assert cli([*argv[:4], str(tmp_path / "elsewhere"), *argv[5:]]) == 2
    assert "no such folder" in capsys.readouterr().err


def write_mmeb(root: Path) -> Path:
    """Three small tasks of three categories in MMEB's columns (parquet), images in ``root/images``."""
    write_images(root)
    write_task(root, "ImageNet-1K", CLASSIFICATION_ROWS, fmt="parquet")
    write_task(root, "MSCOCO_t2i", [  # text query, image candidates
        row(f"Find me an everyday image that matches the given caption: {c} square", "",
            [(f"{MARK} Represent the given image.", f"images/{c}.png"),
             *[(f"{MARK} Represent the given image.", f"images/{o}.png") for o in COLORS if o != c][:2]])
        for c in ("red", "green", "blue")], fmt="parquet")
    write_task(root, "OK-VQA", [  # image and question, text answers
        row(f"{MARK} Represent the given image with the following question: what colour is it", f"images/{c}.png",
            [(c, ""), *[(o, "") for o in COLORS if o != c][:3]]) for c in ("red", "yellow")], fmt="parquet")
    return root


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from embedtrain.models.clip import architecture_config, load_clip_encoder

    torch.manual_seed(0)
    arch = architecture_config(embed_dim=16, image_size=32, patch_size=8, vision_width=16, vision_layers=1,
                               vision_head_width=8, text_width=16, text_layers=1, text_heads=2, context_length=32)
    folder = tmp_path_factory.mktemp("clip") / "model"
    load_clip_encoder("", architecture=arch).save(folder)
    return folder


@pytest.fixture(scope="module")
def vlm_folder(tiny_vlm, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    from embedtrain.models.vlm import load_vlm_encoder

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("vlm2vec") / "model"
    load_vlm_encoder(str(tiny_vlm), finetune="full", image_max_pixels=56 * 56,
                     templates={"query": "{image}{text}", "document": "{image}{text}"}).save(folder)
    return folder


@pytest.mark.parametrize("folder_fixture", ["clip_folder", "vlm_folder"])
def test_folder_evaluates_end_to_end(folder_fixture: str, request: pytest.FixtureRequest, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    from embedtrain.models.loading import load_model

    folder = request.getfixturevalue(folder_fixture)
    root = write_mmeb(tmp_path / "mmeb")
    out = tmp_path / "out"
    assert cli(["eval", "--model", str(folder), "--mmeb", str(root), "--output", str(out), "--batch-size", "4"]) == 0

    results = json.loads((out / "results.json").read_text())
    [run] = results["models"]
    assert run["source"] == str(folder) and run["instructions"] is None
    assert run["settings"]["queries"] == {"ImageNet-1K": 5, "MSCOCO_t2i": 3, "OK-VQA": 2}
    assert ("fusion" in run["settings"]) == (folder_fixture == "clip_folder")
    encoder = load_model(folder)
    expected = {name: evaluate_task(encoder, load_mmeb_task(root / name, root), batch_size=4)
                for name in ("ImageNet-1K", "MSCOCO_t2i", "OK-VQA")}
    assert {r["task"]: r["score"] for r in results["results"]} == expected
    assert {(r["task"], r["task_type"], r["metric"]) for r in results["results"]} == {
        ("ImageNet-1K", "classification", "precision_at_1"), ("MSCOCO_t2i", "retrieval", "precision_at_1"),
        ("OK-VQA", "vqa", "precision_at_1")}
    averages = {a["group"]: a["score"] for a in results["averages"]}
    assert averages == pytest.approx({"classification": expected["ImageNet-1K"], "retrieval": expected["MSCOCO_t2i"],
                                      "vqa": expected["OK-VQA"], "all": sum(expected.values()) / 3})
    assert (out / "summary.csv").is_file() and "precision_at_1" in (out / "summary.md").read_text()

    # the grouped, deduplicated encoding equals embedding each item on its own
    task = load_mmeb_task(root / "OK-VQA", root)
    grouped = encode_items(encoder, task.queries + task.targets, "query", batch_size=4, desc="")
    items = task.queries + task.targets
    single = torch.cat([encode_items(encoder, [it], "query", batch_size=1, desc="") for it in items])
    # float32, a batch of 4 vs 1: padding and matmul blocking change the last bits only
    torch.testing.assert_close(grouped, single, atol=1e-5, rtol=1e-4)


def test_mmeb_refuses_text_models_and_mixed_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mteb_eval_support import build_tiny_model

    model = build_tiny_model(tmp_path / "text")
    root = write_mmeb(tmp_path / "mmeb")
    assert cli(["eval", "--model", str(model), "--mmeb", str(root), "--output", str(tmp_path / "o")]) == 2
    assert "not a CLIP or VLM2Vec folder" in capsys.readouterr().err
    assert cli(["eval", "--model", str(model), "--mmeb", str(root), "--tasks", "SciFact", "--output",
                str(tmp_path / "o")]) == 2
    assert "--mmeb: evaluates one multimodal model on MMEB tasks only" in capsys.readouterr().err
    with pytest.raises(EmbedtrainError, match="--mmeb-tasks vqa: none of its tasks"):
        from embedtrain.eval.mmeb import discover_tasks

        (root / "OK-VQA" / "test-00000-of-00001.parquet").unlink()
        discover_tasks(root, ["vqa"])
