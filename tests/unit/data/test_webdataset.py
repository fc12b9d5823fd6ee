"""Webdataset shards (.tar) as multimodal training rows: the same texts, image bytes and checks as the JSONL and
image-folder form they were written from, with problems named by shard and sample key."""

import io
import json
import tarfile

import pytest

from embedtrain.data.multimodal import read_multimodal_pairs
from embedtrain.data.webdataset import flatten_fields, sample_image
from embedtrain.errors import ConfigError, EmbedtrainError

from conftest import REPO
from multimodal_support import write_image_text_rows, write_image_text_shards

FOLDER_COLUMNS = {"query": ("name", None), "positive": (None, "image")}
SHARD_COLUMNS = {"query": ("txt", None), "positive": (None, "png")}


def _forms(tmp_path, n=10, broken=None):
    jsonl = write_image_text_rows(tmp_path / "rows", n=n, broken=broken)
    shards = write_image_text_shards(tmp_path / "shards", jsonl, rows_per_shard=4)
    return jsonl, shards


def test_shards_read_as_the_rows_they_were_written_from(tmp_path):
    jsonl, shards = _forms(tmp_path)
    assert sorted(p.name for p in shards.iterdir()) == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    folder = read_multimodal_pairs(str(jsonl), "data.train[0]", "emoji", FOLDER_COLUMNS)
    for path in (str(shards), str(shards / "train-*.tar")):  # a folder of shards or a glob
        wds = read_multimodal_pairs(path, "data.train[0]", "emoji", SHARD_COLUMNS)
        assert wds.texts["query"] == folder.texts["query"]
        # the encoded bytes, in the JSONL's row order (keys are its row numbers), not decoded images
        assert wds.images["positive"] == [open(p, "rb").read() for p in folder.images["positive"]]
        assert [key for _, key in wds.samples] == [f"{i:06d}" for i in range(10)]
        assert [shard.rsplit("/", 1)[-1] for shard, _ in wds.samples] == ["train-00000.tar"] * 4 + \
            ["train-00001.tar"] * 4 + ["train-00002.tar"] * 2
        # every image is its own document, as every path is: the epoch plan keeps the same rows apart
        assert len(set(wds.row_keys)) == len(set(folder.row_keys)) == 10
        assert [k[0] for k in wds.row_keys] == [k[0] for k in folder.row_keys]  # same texts, same hashes


def test_fields_of_a_json_member_are_columns(tmp_path):
    jsonl, shards = _forms(tmp_path, n=5)
    groups = [json.loads(line)["group"] for line in jsonl.read_text().splitlines()]
    wds = read_multimodal_pairs(str(shards), "data.train[0]", "emoji", {"query": ("json.group", None),
                                                                         "positive": (None, "png")})
    assert wds.texts["query"] == groups
    with pytest.raises(EmbedtrainError, match=r"column 'json.grup' not in .*\(have: png, txt, json.group, "):
        read_multimodal_pairs(str(shards), "data.train[0]", "emoji", {"query": ("json.grup", None),
                                                                       "positive": (None, "png")})


def test_a_corrupt_image_member_is_skipped_and_counted(tmp_path):
    _, shards = _forms(tmp_path, broken={5: "garbage"})
    wds = read_multimodal_pairs(str(shards), "data.train[0]", "emoji", SHARD_COLUMNS, bad_images="skip")
    assert len(wds) == 9 and wds.dropped == {"bad_images": 1}
    assert [key for _, key in wds.samples] == [f"{i:06d}" for i in range(10) if i != 5]
    (bad,) = wds.skipped
    assert bad.source.endswith("train-00001.tar") and bad.key == "000005" and bad.column == "png"
    assert bad.message().startswith(f"{shards / 'train-00001.tar'} sample 000005: image 000005.png (17 bytes) "
                                    "(column 'png') cannot be decoded (UnidentifiedImageError: ")


def test_a_corrupt_image_member_stops_with_the_shard_and_key(tmp_path):
    _, shards = _forms(tmp_path, broken={5: "garbage"})
    with pytest.raises(EmbedtrainError) as err:
        read_multimodal_pairs(str(shards / "train-*.tar"), "data.train[0]", "emoji", SHARD_COLUMNS)
    text = str(err.value)
    assert "\n" not in text
    assert f"{shards / 'train-00001.tar'} sample 000005: image 000005.png (17 bytes) (column 'png') cannot be decoded" \
        in text and text.endswith("or set data.bad_images: skip to leave such rows out")


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_a_sample_without_its_image_or_text_member_is_one_line(tmp_path):
    png = (REPO / "data" / "emoji" / "images" / "0000.png").read_bytes()
    # the first samples fix the columns (datasets infers them from the first shard's first samples)
    full = [(f"{k}.png", png) for k in "abcde"] + [(f"{k}.txt", b"text") for k in "abcde"]
    full = sorted(full)
    _tar(tmp_path / "a.tar", full + [("f.txt", b"no image here")])
    with pytest.raises(EmbedtrainError, match=r"a.tar sample f: no 'png' member \(the image column\); add it"):
        read_multimodal_pairs(str(tmp_path / "a.tar"), "data.train[0]", "x", SHARD_COLUMNS)
    _tar(tmp_path / "b.tar", full + [("f.png", png)])
    with pytest.raises(EmbedtrainError, match=r"b.tar sample f: no 'txt' member \(the text column\); add it"):
        read_multimodal_pairs(str(tmp_path / "b.tar"), "data.train[0]", "x", SHARD_COLUMNS)
    # an empty image member is an image that does not decode, reported (or skipped) like any other
    _tar(tmp_path / "c.tar", full + [("f.png", b""), ("f.txt", b"empty image")])
    wds = read_multimodal_pairs(str(tmp_path / "c.tar"), "data.train[0]", "x", SHARD_COLUMNS, bad_images="skip")
    assert len(wds) == 5 and wds.skipped[0].key == "f" and "image f.png (0 bytes)" in wds.skipped[0].message()


def test_example_helpers():
    """What a streaming reader calls on one example dict."""
    assert sample_image({"bytes": b"\x89PNG", "path": "k.png"}) == b"\x89PNG"
    assert sample_image(b"\x89PNG") == b"\x89PNG"
    assert sample_image(None) is None and sample_image({"bytes": b"", "path": "k.png"}) is None
    import datasets

    ds = datasets.Dataset.from_list([{"json": {"name": "a", "n": 1}, "txt": "t"}])
    assert flatten_fields(ds, ["txt"]) is ds  # nothing nested wanted: untouched
    assert flatten_fields(ds, ["json.name"]).column_names == ["json.name", "json.n", "txt"]


def test_make_webdataset_is_byte_reproducible(tmp_path):
    jsonl = write_image_text_rows(tmp_path / "rows", n=6)
    first = write_image_text_shards(tmp_path / "one", jsonl, rows_per_shard=4)
    second = write_image_text_shards(tmp_path / "two", jsonl, rows_per_shard=4)
    names = sorted(p.name for p in first.iterdir())
    assert names == ["train-00000.tar", "train-00001.tar"]
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes()
    with tarfile.open(first / "train-00000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["000000.png", "000000.txt", "000000.json"]
    assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(0, 0, 0, 0o644)}
    # a shorter set replaces a longer one: no stale shard is left to be read
    write_image_text_shards(first, jsonl, rows_per_shard=10)
    assert sorted(p.name for p in first.iterdir()) == ["train-00000.tar"]


def test_the_recipe_check_takes_shards_and_rejects_mixed_formats(tmp_path):
    from embedtrain.config import load_recipe

    jsonl, shards = _forms(tmp_path, n=6)
    recipe = REPO / "recipes" / "clip" / "emoji_clip_tiny.yaml"
    columns = ["data.train.0.query_text_column=txt", "data.train.0.positive_image_column=png"]
    for path in (shards, shards / "train-*.tar"):
        assert load_recipe(recipe, [f"data.train.0.path={path}", *columns]).data.train[0].path == str(path)
    (shards / "extra.jsonl").write_text(jsonl.read_text())
    with pytest.raises(ConfigError, match=r"data.train\[0\].path: .*shards of more than one format \(.jsonl, .tar\)"):
        load_recipe(recipe, [f"data.train.0.path={shards}", *columns])


def test_an_image_path_member_is_read_from_the_shards_folder(tmp_path):
    """A column may hold image paths (a text member) instead of the image: relative to the shard's folder."""
    jsonl = write_image_text_rows(tmp_path / "rows", n=6)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    members = []
    for i, row in enumerate(rows):
        members += [(f"{i:06d}.image.txt", row["image"].encode()), (f"{i:06d}.txt", row["name"].encode())]
    _tar(tmp_path / "rows" / "train-00000.tar", members)
    wds = read_multimodal_pairs(str(tmp_path / "rows" / "train-*.tar"), "data.train[0]", "x",
                                {"query": ("txt", None), "positive": (None, "image.txt")})
    folder = read_multimodal_pairs(str(jsonl), "data.train[0]", "x", FOLDER_COLUMNS)
    assert wds.images["positive"] == folder.images["positive"] and wds.row_keys == folder.row_keys


def test_a_folder_of_jsonl_shards_reads_relative_images_from_that_folder(tmp_path):
    jsonl = write_image_text_rows(tmp_path / "rows", n=6)
    lines = jsonl.read_text().splitlines(keepends=True)
    jsonl.unlink()
    (tmp_path / "rows" / "part-0.jsonl").write_text("".join(lines[:4]))
    (tmp_path / "rows" / "part-1.jsonl").write_text("".join(lines[4:]))
    ds = read_multimodal_pairs(str(tmp_path / "rows"), "data.train[0]", "x", FOLDER_COLUMNS)
    assert ds.images["positive"] == [str(tmp_path / "rows" / json.loads(line)["image"]) for line in lines]
