"""Class-balanced batches (m images per class), labelled image reading and the disjoint class split."""

import collections
import json

import pytest
import torch

from embedtrain.data.class_sampler import class_balanced_batches
from embedtrain.data.images import (ImageClassDataset, build_transform, load_rgb, read_labelled_images,
                                    split_classes)
from embedtrain.errors import EmbedtrainError

from vpt_support import write_labelled_images


def labels_with_sizes(sizes):
    return [c for c, n in enumerate(sizes) for _ in range(n)]


@pytest.mark.parametrize("m", [2, 4])
def test_every_batch_has_m_images_of_each_of_its_classes(m):
    labels = labels_with_sizes([9, 5, 1, 12, 7, 3, 8, 4, 6, 10])
    for epoch in range(3):
        batches = class_balanced_batches(labels, batch_size=4 * m, samples_per_class=m, seed=7, epoch=epoch)
        assert batches
        for b in batches:
            counts = collections.Counter(labels[i] for i in b)
            assert len(b) == 4 * m and len(counts) == 4 and set(counts.values()) == {m}
            for i in b:
                assert 0 <= i < len(labels)


def test_batches_are_deterministic_per_seed_and_epoch_and_cover_the_data():
    labels = labels_with_sizes([8] * 10)
    a = class_balanced_batches(labels, 8, 2, seed=1, epoch=0)
    assert a == class_balanced_batches(labels, 8, 2, seed=1, epoch=0)
    assert a != class_balanced_batches(labels, 8, 2, seed=1, epoch=1)
    assert a != class_balanced_batches(labels, 8, 2, seed=2, epoch=0)
    seen = {i for b in a for i in b}
    assert len(seen) >= 0.9 * len(labels)  # at most a few groups are left over at the end of the epoch


def test_a_small_class_is_filled_with_its_own_images():
    labels = labels_with_sizes([1, 6, 6, 6])
    batches = class_balanced_batches(labels, 8, 4, seed=0)
    small = [b for b in batches if 0 in [labels[i] for i in b]]
    assert small and all([i for i in b if labels[i] == 0] == [0, 0, 0, 0] for b in small)


def test_sampler_errors_name_the_field():
    with pytest.raises(EmbedtrainError, match="data.batch_size: 10 is not a multiple"):
        class_balanced_batches([0, 1], 10, 4, seed=0)
    with pytest.raises(EmbedtrainError, match="only 2 training classes"):
        class_balanced_batches([0, 0, 1, 1], 8, 2, seed=0)


def test_class_split_is_disjoint_seeded_and_sorted_on_request():
    classes = [f"c{i:02d}" for i in range(10)]
    train, test = split_classes(classes, 0.5, "random", seed=3)
    assert len(train) == len(test) == 5 and not set(train) & set(test) and set(train) | set(test) == set(classes)
    assert (train, test) == split_classes(classes, 0.5, "random", seed=3)
    assert train != split_classes(classes, 0.5, "random", seed=4)[0]
    assert split_classes(classes, 0.5, "sorted") == (classes[:5], classes[5:])
    with pytest.raises(EmbedtrainError, match="each side needs at least 2"):
        split_classes(classes[:3], 0.5)


def test_metadata_and_class_folders_are_read(tmp_path):
    meta = write_labelled_images(tmp_path / "set", classes=3, per_class=2, size=16)
    images = read_labelled_images(str(meta), "image", "label")
    assert len(images) == 6 and images.classes() == ["class-0", "class-1", "class-2"]
    subset, idx = images.subset(["class-2", "class-0"])
    assert idx == [1, 1, 0, 0] and len(subset) == 4
    # a folder of class folders
    root = tmp_path / "folders"
    for path, label in zip(images.paths, images.labels):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / path.split("/")[-1]).write_bytes(open(path, "rb").read())
    folders = read_labelled_images(str(root))
    assert sorted(folders.labels) == sorted(images.labels)


def test_bad_metadata_is_one_line_naming_the_row(tmp_path):
    meta = write_labelled_images(tmp_path / "set", classes=2, per_class=2, size=16)
    with pytest.raises(EmbedtrainError, match=r"metadata.jsonl:1: missing column subgroup"):
        read_labelled_images(str(meta), "image", "subgroup")
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    rows[2]["image"] = "images/none.png"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(EmbedtrainError, match=r"metadata.jsonl:3: image .*none.png does not exist"):
        read_labelled_images(str(meta), "image", "label")


def test_transparency_is_composited_on_white(tmp_path):
    from PIL import Image

    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(tmp_path / "clear.png")
    assert load_rgb(str(tmp_path / "clear.png")).unique().tolist() == [255]


def test_dataset_gives_normalised_tensors_with_and_without_preloading(tmp_path):
    meta = write_labelled_images(tmp_path / "set", classes=2, per_class=2, size=16)
    images = read_labelled_images(str(meta), "image", "label")
    transform = build_transform((16, 16), (0.5,) * 3, (0.5,) * 3, train=False, augment="none")
    lazy = ImageClassDataset(images, [0, 0, 1, 1], transform)
    cached = ImageClassDataset(images, [0, 0, 1, 1], transform, preload=True, preload_size=16)
    x, y = lazy[1]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0 and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, cached[1][0])
