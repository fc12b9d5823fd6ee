"""Multimodal rows: column roles, image checks with row-and-path messages, collation, GradCache splitting."""

import pytest
import torch

from embedtrain.data.multimodal import MultimodalCollator, read_multimodal_pairs, split_inputs
from embedtrain.data.sampler import PlannedBatch
from embedtrain.errors import EmbedtrainError

from multimodal_support import write_image_text_rows

COLUMNS = {"query": ("name", None), "positive": (None, "image")}


def fake_prepare(texts, images, template):
    """Stands in for a model's input builder: texts -> lengths, images -> mean pixel."""
    if images is not None:
        return {"pixel_values": torch.tensor([[float(sum(im.convert("L").getdata())) / 4096] for im in images])}
    return {"input_ids": torch.tensor([[len(template.replace("{text}", t))] for t in texts])}


def test_reads_roles_and_resolves_image_paths(tmp_path):
    path = write_image_text_rows(tmp_path / "d", n=8)
    ds = read_multimodal_pairs(str(path), "data.train[0]", "emoji", COLUMNS)
    assert len(ds) == 8 and ds.num_negatives == 0
    assert ds.texts["positive"] is None and ds.images["query"] is None
    assert ds.images["positive"][0] == str(tmp_path / "d" / "images" / "0000.png")
    assert len(set(ds.row_keys)) == 8


@pytest.mark.parametrize("kind,reason", [("missing", "not found"), ("garbage", "cannot be decoded")])
def test_bad_image_names_row_and_file(tmp_path, kind, reason):
    path = write_image_text_rows(tmp_path / "d", n=8, broken={5: kind})
    with pytest.raises(EmbedtrainError) as err:
        read_multimodal_pairs(str(path), "data.train[0]", "emoji", COLUMNS)
    message = str(err.value)
    assert f"{path} row 6: image " in message and f"{kind}-0005.png" in message
    assert reason in message and "column 'image'" in message and "data.bad_images: skip" in message
    assert "\n" not in message


def test_skip_drops_and_counts_bad_rows(tmp_path):
    path = write_image_text_rows(tmp_path / "d", n=8, broken={1: "missing", 4: "garbage"})
    ds = read_multimodal_pairs(str(path), "data.train[0]", "emoji", COLUMNS, bad_images="skip")
    assert len(ds) == 6
    assert [b.row for b in ds.skipped] == [2, 5]
    assert ds.line_numbers == [1, 3, 4, 6, 7, 8]


def test_undecodable_file_found_during_training_is_replaced_or_stops(tmp_path):
    path = write_image_text_rows(tmp_path / "d", n=8)
    ds = read_multimodal_pairs(str(path), "data.train[0]", "emoji", COLUMNS)
    # the file breaks after the check, as a file on a network disk might
    (tmp_path / "d" / "images" / "0002.png").write_bytes(b"truncated")
    planned = PlannedBatch(0, (0, 1, 2, 3))

    skip = MultimodalCollator([ds], fake_prepare, bad_images="skip")(planned, planned.rows)
    assert skip["stop"] is False
    assert [b.row for b in skip["bad_images"]] == [3] and "cannot be decoded" in skip["bad_images"][0].reason
    assert skip["query"]["input_ids"].shape == (4, 1) and skip["positive"]["pixel_values"].shape == (4, 1)
    # the row at index 2 is replaced, in place, by the next usable row not in the batch (index 4)
    assert skip["positive_ids"].tolist() == [ds.row_keys[r][1] for r in (0, 1, 4, 3)]

    stop = MultimodalCollator([ds], fake_prepare, bad_images="stop")(planned, planned.rows)
    assert stop["stop"] is True and "query" not in stop
    message = stop["bad_images"][0].message()
    assert message.startswith(f"{path} row 3: image {tmp_path / 'd' / 'images' / '0002.png'} (column 'image') cannot be decoded")


def test_text_roles_and_negatives_collate_in_row_order(tmp_path):
    path = write_image_text_rows(tmp_path / "d", n=6)
    columns = {"query": (None, "image"), "positive": ("name", None), "negative_0": ("group", None),
               "negative_1": ("subgroup", None)}
    ds = read_multimodal_pairs(str(path), "data.train[0]", "emoji", columns, document_template="x {text}")
    batch = MultimodalCollator([ds], fake_prepare)(PlannedBatch(0, (0, 1)), (0, 1))
    expected = [len("x " + ds.texts[c][r]) for r in (0, 1) for c in ("negative_0", "negative_1")]
    assert batch["negative"]["input_ids"].flatten().tolist() == expected
    assert batch["negative_ids"].shape == (4,)


def test_split_inputs_slices_flattened_patches_and_trims_padding():
    # 3 rows; images of 4, 2 and 6 patches flattened as Qwen2-VL's processor does; left padding
    inputs = {
        "input_ids": torch.tensor([[0, 5, 6], [0, 0, 7], [8, 9, 10]]),
        "attention_mask": torch.tensor([[0, 1, 1], [0, 0, 1], [1, 1, 1]]),
        "pixel_values": torch.arange(12).float().unsqueeze(1),
        "image_grid_thw": torch.tensor([[1, 2, 2], [1, 1, 2], [1, 2, 3]]),
    }
    first, second = list(split_inputs(inputs, 2))
    assert first["pixel_values"].flatten().tolist() == [0, 1, 2, 3, 4, 5]
    assert first["input_ids"].tolist() == [[5, 6], [0, 7]]  # the all-padding first column is dropped
    assert second["pixel_values"].flatten().tolist() == list(range(6, 12))
    assert second["image_grid_thw"].tolist() == [[1, 2, 3]] and second["input_ids"].tolist() == [[8, 9, 10]]
