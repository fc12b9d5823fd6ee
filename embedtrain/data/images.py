"""Labelled images for deep metric learning: reading, a disjoint class split, transforms, a Dataset.

Two layouts are read:

- a metadata file (``.jsonl``, ``.json`` or ``.csv``) with an image column (a path relative to the
  file's folder, or absolute) and a label column, e.g. ``data/emoji/metadata.jsonl`` with
  ``image`` and ``subgroup``;
- a folder of class folders (``ROOT/<class>/<image>``), e.g. CUB-200-2011's ``images/`` folder.

Zero-shot metric learning trains on some classes and evaluates on the others:
:func:`split_classes` divides the class names into two disjoint sets, either the first part of the
sorted names (the usual CUB-200 split: classes 1-100 train, 101-200 test) or a seeded random part.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from embedtrain.jsonl import json_lines
from embedtrain.errors import EmbedtrainError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class LabelledImages:
    """Image files and their class names, in file order."""

    paths: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def subset(self, classes: Sequence[str]) -> tuple["LabelledImages", list[int]]:
        """The images of ``classes`` and their label indices (position of the class in ``classes``)."""
        index = {c: i for i, c in enumerate(classes)}
        keep = [i for i, label in enumerate(self.labels) if label in index]
        return (LabelledImages([self.paths[i] for i in keep], [self.labels[i] for i in keep]),
                [index[self.labels[i]] for i in keep])


def read_labelled_images(path: str, image_column: str = "image", label_column: str = "label",
                         where: str = "data.path") -> LabelledImages:
    """Read a metadata file or a folder of class folders; every image file must exist."""
    p = Path(path).expanduser()
    if p.is_dir():
        return _read_class_folders(p, where)
    if not p.is_file():
        raise EmbedtrainError(f"{where}: {p} does not exist; give a metadata file or a folder of class folders")
    rows = _read_rows(p, where)
    paths, labels = [], []
    for line, row in rows:
        missing = [c for c in (image_column, label_column) if c not in row]
        if missing:
            raise EmbedtrainError(f"{p}:{line}: missing column {', '.join(missing)} (have: {', '.join(map(str, row))}); "
                                  f"set data.image_column / data.label_column")
        image, label = row[image_column], row[label_column]
        if not isinstance(image, str) or not image:
            raise EmbedtrainError(f"{p}:{line}: {image_column} must be a file path, got {image!r}")
        if label is None or label == "":
            raise EmbedtrainError(f"{p}:{line}: {label_column} is empty; every image needs a class")
        file = Path(image) if Path(image).is_absolute() else p.parent / image
        if not file.is_file():
            raise EmbedtrainError(f"{p}:{line}: image {file} does not exist")
        paths.append(str(file))
        labels.append(str(label))
    if not paths:
        raise EmbedtrainError(f"{where}: {p} has no rows")
    return LabelledImages(paths, labels)


def _read_rows(p: Path, where: str) -> list[tuple[int, dict]]:
    suffix = p.suffix.lower()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise EmbedtrainError(f"{where}: cannot read {p} ({type(err).__name__})") from None
    if suffix == ".jsonl":
        rows = []
        for line_no, row in json_lines(text, p):
            if not isinstance(row, dict):
                raise EmbedtrainError(f"{p}:{line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append((line_no, row))
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError:
            raise EmbedtrainError(f"{p}: not valid JSON") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise EmbedtrainError(f"{p}: expected a JSON list of objects")
        return [(i + 1, r) for i, r in enumerate(data)]
    if suffix == ".csv":
        return [(i + 2, dict(r)) for i, r in enumerate(csv.DictReader(text.splitlines()))]
    raise EmbedtrainError(f"{where}: {p} has an unsupported format; use .jsonl, .json, .csv or a folder of class folders")


def _read_class_folders(root: Path, where: str) -> LabelledImages:
    paths, labels = [], []
    for folder in sorted(d for d in root.iterdir() if d.is_dir()):
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
                paths.append(str(file))
                labels.append(folder.name)
    if not paths:
        raise EmbedtrainError(f"{where}: {root} has no class folders with images (expected ROOT/<class>/<image>)")
    return LabelledImages(paths, labels)


def split_classes(classes: Sequence[str], train_fraction: float = 0.5, mode: Literal["sorted", "random"] = "random",
                  seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint (train, test) class lists, each sorted. ``sorted``: the first part of the sorted names;
    ``random``: a part drawn with ``random.Random(seed)``."""
    names = sorted(set(classes))
    n_train = int(round(train_fraction * len(names)))
    if n_train < 2 or len(names) - n_train < 2:
        raise EmbedtrainError(
            f"data.train_class_fraction: {train_fraction} of {len(names)} classes leaves {n_train} to train and "
            f"{len(names) - n_train} to test; each side needs at least 2"
        )
    if mode == "random":
        order = names[:]
        random.Random(seed).shuffle(order)
        train = sorted(order[:n_train])
    elif mode == "sorted":
        train = names[:n_train]
    else:
        raise EmbedtrainError(f"data.class_split: {mode!r} is not one of sorted, random")
    test = sorted(set(names) - set(train))
    return train, test


# --------------------------------------------------------------------------------------
# Decoding and transforms
# --------------------------------------------------------------------------------------


def load_rgb(path: str, background: tuple[int, int, int] = (255, 255, 255)) -> torch.Tensor:
    """An image file as a uint8 (3, H, W) tensor; transparency is composited onto ``background``."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "P") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                canvas = Image.new("RGBA", rgba.size, (*background, 255))
                img = Image.alpha_composite(canvas, rgba).convert("RGB")
            else:
                img = img.convert("RGB")
            array = np.asarray(img, dtype=np.uint8).copy()
    except OSError as err:
        raise EmbedtrainError(f"{path}: cannot read the image ({err})") from None
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def build_transform(image_size: Sequence[int], mean: Sequence[float], std: Sequence[float], train: bool,
                    augment: Literal["none", "flip", "crop_flip"] = "crop_flip", resize: Optional[int] = None,
                    min_crop_scale: float = 0.5):
    """uint8 (3, H, W) → normalised float (3, h, w) at ``image_size``.

    Evaluation: resize the shorter side to ``resize`` (default: the image size), centre crop.
    Training: 'crop_flip' = random resized crop (area ``min_crop_scale``..1) + horizontal flip,
    'flip' = the evaluation transform + horizontal flip, 'none' = the evaluation transform.
    """
    from torchvision.transforms import v2

    size = tuple(int(s) for s in image_size)
    steps = []
    if train and augment == "crop_flip":
        steps.append(v2.RandomResizedCrop(size, scale=(min_crop_scale, 1.0), antialias=True))
    else:
        steps += [v2.Resize(resize or min(size), antialias=True), v2.CenterCrop(size)]
    if train and augment in ("flip", "crop_flip"):
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


class ImageClassDataset(torch.utils.data.Dataset):
    """(image tensor, label index) pairs; ``preload`` decodes every image once into memory (uint8,
    shorter side resized to ``preload_size``) so later epochs skip the file decoding."""

    def __init__(self, images: LabelledImages, labels: Sequence[int], transform, preload: bool = False,
                 preload_size: Optional[int] = None):
        self.paths, self.labels, self.transform = list(images.paths), [int(x) for x in labels], transform
        self.cache: Optional[list[torch.Tensor]] = None
        if preload:
            from torchvision.transforms import v2

            resize = v2.Resize(preload_size, antialias=True) if preload_size else None
            self.cache = []
            for path in self.paths:
                img = load_rgb(path)
                self.cache.append(resize(img) if resize is not None and min(img.shape[1:]) != preload_size else img)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = self.cache[index] if self.cache is not None else load_rgb(self.paths[index])
        return self.transform(img), self.labels[index]


def collate_images(batch: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    pixels, labels = zip(*batch)
    return {"pixels": torch.stack(pixels), "labels": torch.tensor(labels, dtype=torch.long)}
