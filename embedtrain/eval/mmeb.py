"""MMEB evaluation (VLM2Vec's benchmark, Jiang et al., arXiv:2410.05160) of multimodal models on local data.

mteb's image tasks (MIEB) cover some of the same datasets but score them another way (retrieval over the whole
corpus, nDCG); MMEB ranks each query against *its own* candidate set, so this module scores that protocol itself:

- a task is a folder of rows with ``qry_text``, ``qry_img_path`` (the query: text, image or both),
  ``tgt_text`` and ``tgt_img_path`` (lists of the same length: the candidates, the **first one the positive**),
  as in ``TIGER-Lab/MMEB-eval`` (``hf download TIGER-Lab/MMEB-eval --repo-type dataset --local-dir DIR``; one
  folder per task holding ``.parquet`` files; ``.jsonl`` files of the same columns also work). Image paths are
  relative to an images folder (the unzipped ``images.zip``). Texts mark their image with ``<|image_1|>``; the
  marker is removed and the model's template puts its own image token there, as in training
  (``scripts/prepare_mmeb.py``);
- queries are embedded in the 'query' role, the distinct candidates (one embedding per (text, image) pair) in
  the 'document' role, each with the model's saved template;
- precision@1 per task: the share of queries whose highest-cosine candidate is the positive (index 0; on a tie
  the first candidate wins, as ``argmax`` picks it);
- averages per category (classification, VQA, retrieval, grounding) over that category's tasks, and over all
  evaluated tasks (MMEB's overall score is the mean over its 36 tasks).

A CLIP model embeds a text or an image; an item with both (a VQA query: image and question) is embedded as the
normalised sum of its image and text embeddings, which the run reports. Problems with the data (a missing file or
column, a bad row, a missing image) are one line naming the file and row, found before the model is loaded.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from embedtrain.errors import EmbedtrainError, did_you_mean
from embedtrain.jsonl import json_lines

CATEGORIES: dict[str, tuple[str, ...]] = {
    "classification": ("ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365", "ImageNet-A",
                       "ImageNet-R", "ObjectNet", "Country211"),
    "vqa": ("OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA", "VizWiz", "GQA",
            "TextVQA"),
    "retrieval": ("VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t", "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS",
                  "WebQA", "FashionIQ", "Wiki-SS-NQ", "OVEN", "EDIS"),
    "grounding": ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
}
"""MMEB's 36 evaluation tasks by meta-task (VLM2Vec, Table 1)."""
OTHER = "other"
"""The category of a task folder whose name is not one of MMEB's (reported as such)."""
METRIC = "precision_at_1"
IMAGE_MARKER = "<|image_1|>"
"""How MMEB's texts mark their image (Phi-3.5-V's token)."""
COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
DATA_SUFFIXES = (".parquet", ".jsonl")
CLIP_FUSION = "CLIP: an item with an image and a text is the normalised sum of its image and text embeddings"


def category_of(task: str) -> str:
    """MMEB's meta-task of ``task`` ('other' for a name MMEB does not have)."""
    return next((c for c, names in CATEGORIES.items() if task in names), OTHER)


@dataclass(frozen=True)
class Item:
    """A query or a candidate: text ('' when none) and an image path (None when none)."""

    text: str
    image: Optional[str]


@dataclass
class MmebTask:
    """One MMEB task: queries, the distinct candidates, and each query's candidate indices (positive first)."""

    name: str
    category: str
    queries: list[Item]
    targets: list[Item]
    candidates: list[list[int]]


def clean_text(text: Any) -> str:
    """The text without MMEB's image marker (the model's template places the image)."""
    text = "" if text is None else str(text)
    return text.replace(IMAGE_MARKER, "", 1) if text.startswith(IMAGE_MARKER) else text.replace(IMAGE_MARKER, "")


def data_files(folder: Path) -> list[Path]:
    """The task's data files: ``.parquet`` or ``.jsonl`` files in the folder (a ``test`` split's when named so)."""
    found = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
    tests = [p for p in found if p.name.startswith("test") or p.parent.name == "test"]
    return tests or found


def _rows(path: Path):
    """(row label, row) of a data file; rows are numbered from 1 (lines for JSON lines)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for unreadable files
            raise EmbedtrainError(f"{path}: not a readable parquet file ({type(err).__name__}); "
                                  "download the task again") from None
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise EmbedtrainError(f"{path}: missing column(s) {', '.join(missing)} (have: "
                                  f"{', '.join(table.column_names)}); MMEB rows have {', '.join(COLUMNS)}")
        for i, row in enumerate(table.to_pylist(), 1):
            yield f"{path} row {i}", row
        return
    for line_no, row in json_lines(path.read_text(encoding="utf-8"), path):
        if not isinstance(row, dict):
            raise EmbedtrainError(f"{path}:{line_no}: not a JSON object; each line must be one MMEB row")
        yield f"{path}:{line_no}", row


def _image(path: Any, where: str, field_name: str, images: Path) -> Optional[str]:
    if path is None or path == "":
        return None
    if not isinstance(path, str):
        raise EmbedtrainError(f"{where}: {field_name} must be a path (a string), got {type(path).__name__}")
    full = images / path
    if not full.is_file():
        raise EmbedtrainError(f"{where}: image {path} not found under {images}; unzip MMEB-eval's images there "
                              "or point --mmeb-images at the folder the rows' paths are relative to")
    return str(full)


def load_mmeb_task(folder: str | Path, images: str | Path, name: Optional[str] = None) -> MmebTask:
    """Read and check one task folder (every row, every image's existence); one-line errors naming file and row."""
    folder, images = Path(folder), Path(images)
    name = name or folder.name
    files = data_files(folder) if folder.is_dir() else []
    if not files:
        raise EmbedtrainError(f"MMEB task {name}: no .parquet or .jsonl files in {folder}; give the folder of a "
                              "TIGER-Lab/MMEB-eval download (one folder per task)")
    queries: list[Item] = []
    targets: dict[Item, int] = {}
    candidates: list[list[int]] = []
    for path in files:
        for where, row in _rows(path):
            missing = [c for c in COLUMNS if c not in row]
            if missing:
                raise EmbedtrainError(f"{where}: missing {', '.join(missing)} (have: {', '.join(row)})")
            query = Item(clean_text(row["qry_text"]), _image(row["qry_img_path"], where, "qry_img_path", images))
            if not query.text.strip() and query.image is None:
                raise EmbedtrainError(f"{where}: the query has neither text nor image")
            texts, paths = row["tgt_text"], row["tgt_img_path"]
            if not isinstance(texts, list) or not isinstance(paths, list):
                raise EmbedtrainError(f"{where}: tgt_text and tgt_img_path must be lists (one entry per candidate)")
            if not texts or len(texts) != len(paths):
                raise EmbedtrainError(f"{where}: tgt_text has {len(texts)} candidates and tgt_img_path {len(paths)}; "
                                      "give one (text, image) pair per candidate, the positive first")
            indices = []
            for j, (text, path_j) in enumerate(zip(texts, paths)):
                item = Item(clean_text(text), _image(path_j, where, f"tgt_img_path[{j}]", images))
                if not item.text.strip() and item.image is None:
                    raise EmbedtrainError(f"{where}: candidate {j} has neither text nor image")
                indices.append(targets.setdefault(item, len(targets)))
            queries.append(query)
            candidates.append(indices)
    if not queries:
        raise EmbedtrainError(f"MMEB task {name}: {folder} has no rows")
    return MmebTask(name, category_of(name), queries, list(targets), candidates)


def discover_tasks(root: str | Path, selection: Sequence[str] = ()) -> list[tuple[str, Path]]:
    """``(name, folder)`` of the task folders under ``root`` (those with data files), in name order, limited to
    ``selection`` (task names or category names) when given."""
    root = Path(root)
    if not root.is_dir():
        raise EmbedtrainError(f"--mmeb {root}: no such folder; give a TIGER-Lab/MMEB-eval download "
                              "(one folder per task)")
    found = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and data_files(p)}
    if not found:
        raise EmbedtrainError(f"--mmeb {root}: no task folders with .parquet or .jsonl files")
    if not selection:
        return list(found.items())
    chosen: dict[str, Path] = {}
    for wanted in selection:
        if wanted in CATEGORIES:
            names = [n for n in CATEGORIES[wanted] if n in found]
            if not names:
                raise EmbedtrainError(f"--mmeb-tasks {wanted}: none of its tasks is in {root}")
            chosen.update((n, found[n]) for n in names)
        elif wanted in found:
            chosen[wanted] = found[wanted]
        else:
            raise EmbedtrainError(f"--mmeb-tasks: no task folder '{wanted}' in {root}"
                                  f"{did_you_mean(wanted, [*found, *CATEGORIES])}; give task folder names or "
                                  f"categories ({', '.join(CATEGORIES)})")
    return list(chosen.items())


# -- encoding and scoring ----------------------------------------------------------------------------
def encode_items(encoder, items: Sequence[Item], role: str, batch_size: int, desc: str) -> torch.Tensor:
    """Embeddings (n, dim) of ``items`` in order, through ``encoder.encode_items`` with the role's template.

    Items are grouped so that each call has images for all or for none (what the encoders take). For a CLIP
    model (``encoder.kind == 'clip'``) an item with text and image is the normalised sum of both embeddings.
    """
    clip = getattr(encoder, "kind", None) == "clip"
    out: Optional[torch.Tensor] = None

    def run(indices: list[int], texts: bool, images: bool) -> torch.Tensor:
        return encoder.encode_items(texts=[items[i].text for i in indices] if texts else None,
                                    images=[items[i].image for i in indices] if images else None,
                                    role=role, batch_size=batch_size, show_progress=True, desc=desc)

    def put(indices: list[int], vectors: torch.Tensor) -> None:
        nonlocal out
        if out is None:
            out = torch.empty(len(items), vectors.shape[1], dtype=torch.float32)
        out[indices] = vectors.float()

    with_image = [i for i, it in enumerate(items) if it.image is not None]
    text_only = [i for i, it in enumerate(items) if it.image is None]
    if text_only:
        put(text_only, run(text_only, True, False))
    if with_image and not clip:
        put(with_image, run(with_image, True, True))
    elif with_image:
        both = [i for i in with_image if items[i].text.strip()]
        image_only = [i for i in with_image if not items[i].text.strip()]
        if image_only:
            put(image_only, run(image_only, False, True))
        if both:
            image = F.normalize(run(both, False, True).float(), dim=-1)
            text = F.normalize(run(both, True, False).float(), dim=-1)
            fused = image + text
            put(both, F.normalize(fused, dim=-1))
    assert out is not None
    return out


def precision_at_1(queries: torch.Tensor, targets: torch.Tensor, candidates: Sequence[Sequence[int]]) -> float:
    """Share of queries whose highest-cosine candidate is the first (the positive); ties go to the first one.

    ``queries``: (n, dim); ``targets``: (m, dim); ``candidates[i]``: indices into ``targets``, positive first.
    """
    q = F.normalize(queries.float(), dim=-1)
    t = F.normalize(targets.float(), dim=-1)
    correct = 0
    for i, cands in enumerate(candidates):
        scores = t[list(cands)] @ q[i]
        correct += int(torch.argmax(scores).item() == 0)
    return correct / len(candidates)


def evaluate_task(encoder, task: MmebTask, batch_size: int) -> float:
    """precision@1 of ``encoder`` on ``task``."""
    queries = encode_items(encoder, task.queries, "query", batch_size, f"{task.name} queries")
    targets = encode_items(encoder, task.targets, "document", batch_size, f"{task.name} candidates")
    return precision_at_1(queries, targets, task.candidates)


def model_revision(spec: str) -> str:
    """First 12 hex digits of a sha256 over the weight files of a local model folder ('' for other models)."""
    import hashlib

    from embedtrain.config import looks_local, resolve_path
    from embedtrain.eval.mteb_adapter import REVISION_LENGTH, _hash_files, _weight_files

    if not looks_local(spec):
        return ""
    folder = Path(resolve_path(spec))
    files = _weight_files(folder) if folder.is_dir() else []
    if not files:
        return ""
    digest = hashlib.sha256()
    _hash_files(files, folder, digest)
    return digest.hexdigest()[:REVISION_LENGTH]


def run_mmeb(args) -> int:
    """``embedtrain eval --model FOLDER --mmeb DIR [--mmeb-images DIR] [--mmeb-tasks ...] --output OUT``."""
    from embedtrain.eval.mteb_run import Outcome, summary_markdown, write_results, write_summary
    from embedtrain.eval.multimodal_run import load_multimodal_encoder, model_kind

    if args.tasks or args.benchmark or args.task_types or args.local_task or args.compare or args.instructions:
        raise EmbedtrainError("--mmeb: evaluates one multimodal model on MMEB tasks only; run --tasks, --benchmark, "
                              "--task-types, --local-task, --compare and --instructions separately")
    if args.batch_size < 1:
        raise EmbedtrainError(f"--batch-size: {args.batch_size} must be at least 1")
    images = Path(args.mmeb_images or args.mmeb)
    if not images.is_dir():
        raise EmbedtrainError(f"--mmeb-images {images}: no such folder; give the folder the rows' image paths are "
                              "relative to (MMEB-eval's unzipped images.zip)")
    tasks = [load_mmeb_task(folder, images, name) for name, folder in discover_tasks(args.mmeb, args.mmeb_tasks)]
    others = [t.name for t in tasks if t.category == OTHER]
    if others:
        print(f"note: not MMEB tasks, averaged under '{OTHER}': {', '.join(others)}", file=sys.stderr)
    kind = model_kind(args.model)
    if kind is None:
        from embedtrain.config import looks_local

        if looks_local(args.model):
            raise EmbedtrainError(f"--model {args.model}: not a CLIP or VLM2Vec folder; MMEB evaluates "
                                  "image-text models")
    encoder = load_multimodal_encoder(args.model)
    if kind == "clip":
        print(f"note: {CLIP_FUSION}", file=sys.stderr)
    from embedtrain.eval.mteb_adapter import default_model_name

    label = default_model_name(args.model)
    revision = model_revision(args.model)
    outcomes = []
    for task in tasks:
        score = evaluate_task(encoder, task, args.batch_size)
        outcomes.append(Outcome(label, revision, task.name, task.category, METRIC, score=score))
    output = Path(args.output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EmbedtrainError(f"--output {output}: cannot be created ({err.strerror or err})") from None
    settings = {"benchmark": "MMEB", "data": str(Path(args.mmeb).resolve()), "images": str(images.resolve()),
                "templates": dict(getattr(encoder, "templates", {}) or {}),
                "queries": {t.name: len(t.queries) for t in tasks},
                "candidates": {t.name: len(t.targets) for t in tasks}}
    if kind == "clip":
        settings["fusion"] = CLIP_FUSION
    write_summary(outcomes, output)
    averages = write_results(output, [{"model": label, "revision": revision, "source": args.model,
                                       "instructions": None, "settings": settings}], outcomes)
    print(summary_markdown(outcomes))
    print()
    print("\n".join(f"{a['group']}: {100 * a['score']:.2f} ({a['tasks']} tasks)" for a in averages))
    return 0
