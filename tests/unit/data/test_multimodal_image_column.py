"""Images stored inside the dataset (a datasets Image column in parquet) rather than as paths."""

import pytest
import torch

from embedtrain.data.multimodal import MultimodalCollator, read_multimodal_pairs
from embedtrain.data.sampler import PlannedBatch
from embedtrain.errors import EmbedtrainError

from multimodal_support import EMOJI, emoji_rows


def write_parquet(path, rows, broken_row=None):
    import datasets

    images = [{"bytes": (EMOJI / r["image"]).read_bytes(), "path": None} for r in rows]
    if broken_row is not None:
        images[broken_row] = {"bytes": b"not an image at all", "path": None}
    ds = datasets.Dataset.from_dict({"name": [r["name"] for r in rows], "picture": images},
                                    features=datasets.Features({"name": datasets.Value("string"),
                                                                "picture": datasets.Image()}))
    ds.to_parquet(str(path))
    return path


def test_image_column_bytes_are_decoded_by_the_collator(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", emoji_rows(6))
    ds = read_multimodal_pairs(str(path), "data.train[0]", "pics", {"query": ("name", None), "positive": (None, "picture")})
    assert isinstance(ds.images["positive"][0], bytes)
    seen = []

    def prepare(texts, images, template):
        seen.append(images)
        return {"input_ids": torch.zeros(len(texts or images), 1)}

    MultimodalCollator([ds], prepare)(PlannedBatch(0, (0, 1, 2)), (0, 1, 2))
    decoded = [im for batch in seen if batch for im in batch]
    assert len(decoded) == 3 and decoded[0].size == (64, 64)


def test_undecodable_bytes_name_the_row(tmp_path):
    path = write_parquet(tmp_path / "train.parquet", emoji_rows(6), broken_row=2)
    with pytest.raises(EmbedtrainError, match=r"train.parquet row 3: image <19 bytes in the dataset> \(column 'picture'\) "
                                              r"cannot be decoded"):
        read_multimodal_pairs(str(path), "data.train[0]", "pics", {"query": ("name", None), "positive": (None, "picture")})
