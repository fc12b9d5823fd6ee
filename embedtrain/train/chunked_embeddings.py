"""Embeddings of large text sets written to disk in chunks: shared across processes and resumable.

``embedtrain mine`` embeds every query and every corpus text with a teacher, which for a 7B teacher and a
web-scale corpus is hours of work. :func:`embed_in_chunks` cuts each set of texts into chunks of
``chunk_rows`` texts and writes each chunk's embeddings to its own file in a cache folder:

- under several processes (``torchrun`` / ``accelerate launch``) each process embeds the chunks whose number
  is its rank modulo the process count; then every process can read every chunk;
- a run that stops (killed, out of memory, a lost machine) is resumed by running the same command: chunks
  already written are read back instead of embedded again;
- each chunk is written through a temporary file and a rename, so a chunk file is whole or absent.

The folder's ``manifest.json`` records what the embeddings are of: the teacher (its files' names, sizes and
modification times when it is a local folder), the prompts and token limits, and a SHA-256 of each set's
texts. A folder made for other texts or another teacher is refused with one line, never mixed in. Each chunk
file records the SHA-256 of its own texts and is checked when it is read back.

A chunk's texts are embedded in one ``encode`` call, batched by length within the chunk, so its embeddings do
not depend on which process embedded it or whether the run was resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from embedtrain.errors import EmbedtrainError

MANIFEST = "manifest.json"
FORMAT = "embedtrain-chunked-embeddings-1"
MISSING = "missing after every process embedded its chunks; is the cache folder on a file system every process shares?"
PAUSE_ENV = "EMBEDTRAIN_TEST_PAUSE_AFTER_CHUNK"
"""Tests only: ``SECONDS@N`` sleeps after the N-th chunk this process writes (N counts from 1), so that a test
can kill a run between two chunks."""


@dataclass(frozen=True)
class TextSet:
    """One set of texts to embed (``name`` names its chunk files), with its role and prompt."""

    name: str
    texts: Sequence[str]
    role: str
    prompt: str


def texts_digest(texts: Sequence[str]) -> str:
    """SHA-256 of ``texts`` in order (each text's UTF-8 bytes and its length, so no two lists collide)."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def folder_fingerprint(path: str) -> Optional[str]:
    """SHA-256 of the names, sizes and modification times of the files under a local model folder (None for a
    Hub id): a teacher saved again at the same path gets a new fingerprint."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    h = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = file.stat()
        h.update(f"{file.relative_to(folder).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _chunk_path(folder: Path, name: str, index: int) -> Path:
    return folder / f"{name}-{index:05d}.safetensors"


def _jobs(sets: Sequence[TextSet], chunk_rows: int) -> list[tuple[int, int, int, int]]:
    """(set, chunk, start, end) for every chunk of every set, in order."""
    jobs = []
    for s, text_set in enumerate(sets):
        for c, start in enumerate(range(0, len(text_set.texts), chunk_rows)):
            jobs.append((s, c, start, min(start + chunk_rows, len(text_set.texts))))
    return jobs


def _read_chunk(path: Path, texts: Sequence[str], dim: int, load: bool = True) -> Optional[torch.Tensor]:
    """The embeddings of chunk file ``path`` when it exists, checked against its texts; None when absent. With
    ``load=False`` only the header is read and checked (an empty tensor is returned for a good chunk): the scan of a
    resumed run, whose chunks the main process reads once, later."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    fix = f"delete {path} (or its whole folder) and run the command again"
    try:
        with safe_open(str(path), framework="pt") as f:
            digest = (f.metadata() or {}).get("texts_sha256")
            shape = tuple(f.get_slice("embeddings").get_shape())
            embeddings = f.get_tensor("embeddings") if load else torch.empty(0)
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise EmbedtrainError(f"{path}: cannot be read ({type(err).__name__}: {err}); {fix}") from None
    if digest != texts_digest(texts):
        raise EmbedtrainError(f"{path}: holds the embeddings of other texts than this chunk's; {fix}")
    if shape != (len(texts), dim):
        raise EmbedtrainError(f"{path}: holds {shape} embeddings, this chunk needs ({len(texts)}, {dim}); {fix}")
    return embeddings


def _write_chunk(path: Path, embeddings: torch.Tensor, texts: Sequence[str]) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"embeddings": embeddings.contiguous()}, str(tmp), metadata={"texts_sha256": texts_digest(texts)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_manifest(folder: Path, manifest: dict) -> Optional[str]:
    """The problem with the folder's manifest for this work (None when it matches or there is none yet)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{path}: cannot be read ({err}); delete {folder} and run the command again"
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        return f"{path}: not a manifest of embedtrain's chunked embeddings; delete {folder} or give another cache folder"
    from embedtrain.train.checkpoint import flatten

    saved, wanted = flatten(saved), flatten(manifest)
    differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if differ:
        return (f"{folder}: holds embeddings made for other work ({', '.join(differ)} differ); delete the folder "
                "to embed again, or give another cache folder")
    return None


def _pause_after(written: int) -> None:
    value = os.environ.get(PAUSE_ENV, "").strip()
    if value:
        seconds, _, after = value.partition("@")
        if int(after or 1) == written:
            import time

            time.sleep(float(seconds))


@dataclass(frozen=True)
class Embedded:
    """The cached embeddings of one set of texts, read back chunk by chunk (each checked against its texts)."""

    folder: Path
    text_set: TextSet
    chunk_rows: int
    dim: int

    def paths(self) -> Iterator[tuple[int, Path]]:
        for c, start in enumerate(range(0, len(self.text_set.texts), self.chunk_rows)):
            yield start, _chunk_path(self.folder, self.text_set.name, c)

    def chunks(self, first: int = 0, end: Optional[int] = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset, embeddings) of every chunk in order, float32; only those holding rows ``first`` to ``end``
        (exclusive; default: to the last) when given."""
        texts = self.text_set.texts
        end = len(texts) if end is None else end
        for start, path in self.paths():
            if start >= end or start + self.chunk_rows <= first:
                continue
            embeddings = _read_chunk(path, texts[start:start + self.chunk_rows], self.dim)
            if embeddings is None:
                raise EmbedtrainError(f"{path}: {MISSING}")
            yield start, embeddings

    def load(self, first: int = 0, end: Optional[int] = None) -> torch.Tensor:
        """The embeddings of rows ``first`` to ``end`` (exclusive; default: every row), (rows, dim) in input order,
        read from the chunks that hold them."""
        end = len(self.text_set.texts) if end is None else end
        out = torch.empty(max(end - first, 0), self.dim, dtype=torch.float32)
        for start, embeddings in self.chunks(first, end):
            lo, hi = max(start, first), min(start + embeddings.shape[0], end)
            out[lo - first:hi - first] = embeddings[lo - start:hi - start]
        return out


def embed_in_chunks(encoder, sets: Sequence[TextSet], folder: str | os.PathLike, identity: dict, state,
                    chunk_rows: int = 16384, batch_size: int = 128, log=print) -> list[Embedded]:
    """Embed every set of texts in chunks cached under ``folder``; the embeddings of each set, to read back chunk by
    chunk, whole or in part (:class:`Embedded`), on every process once all have embedded their chunks.

    ``identity``: what else the embeddings depend on (the teacher, token limits), recorded in the manifest
    beside each set's digest. ``state``: accelerate's ``PartialState`` (one process or several).
    """
    from embedtrain.train.checkpoint import atomic_write_text, raise_if_any

    folder = Path(folder)
    dim = encoder.embedding_dim
    manifest = {"format": FORMAT, **identity, "dim": dim, "chunk_rows": chunk_rows,
                "sets": {s.name: {"texts": len(s.texts), "sha256": texts_digest(s.texts), "role": s.role,
                                  "prompt": s.prompt} for s in sets}}
    problem = _check_manifest(folder, manifest)  # every process reads it: all refuse the same folder
    if problem is None and state.is_main_process:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        except OSError as err:
            problem = f"{folder}: cannot write the embedding cache ({err.strerror or err}); give a writable --cache"
    raise_if_any(state, problem)
    state.wait_for_everyone()

    jobs = _jobs(sets, chunk_rows)
    mine = jobs[state.process_index::state.num_processes]
    todo, reused, problem = [], 0, None
    try:
        for job in mine:
            s, c, start, end = job
            if _read_chunk(_chunk_path(folder, sets[s].name, c), sets[s].texts[start:end], dim, load=False) is None:
                todo.append(job)
            else:
                reused += 1
    except EmbedtrainError as err:
        problem = str(err)
    raise_if_any(state, problem)
    where = f"process {state.process_index} of {state.num_processes}: " if state.num_processes > 1 else ""
    total = sum(len(s.texts) for s in sets)
    log(f"embedding on {encoder.device}: {where}{len(mine)} of {len(jobs)} chunks of {chunk_rows} texts ({total} texts in all); "
        f"{reused} already in {folder}, {len(todo)} to embed")

    from tqdm.auto import tqdm

    bar = tqdm(total=sum(end - start for _, _, start, end in todo), desc="embedding", unit="text",
               disable=None if state.is_main_process else True)
    problem = None
    try:
        for written, (s, c, start, end) in enumerate(todo, 1):
            text_set = sets[s]
            texts = list(text_set.texts[start:end])
            embeddings = encoder.encode(texts, role=text_set.role, prompt=text_set.prompt, batch_size=batch_size)
            _write_chunk(_chunk_path(folder, text_set.name, c), embeddings.float(), texts)
            bar.update(end - start)
            _pause_after(written)
    except OSError as err:
        problem = f"{folder}: cannot write an embedding chunk ({err.strerror or err}); free space or give another --cache"
    finally:
        bar.close()
    raise_if_any(state, problem)
    state.wait_for_everyone()

    embedded = [Embedded(folder, s, chunk_rows, dim) for s in sets]
    missing = [str(path) for e in embedded for _, path in e.paths() if not path.is_file()]
    if missing:  # every process sees the same folder, so every process stops alike
        raise EmbedtrainError(f"{missing[0]} ({len(missing)} chunks in all): {MISSING}")
    return embedded


def share_of(rows: int, state) -> tuple[int, int]:
    """The contiguous rows (first, end) that process ``state.process_index`` of ``state.num_processes`` takes of
    ``rows``: equal shares, the last ones shorter (empty when there are more processes than rows)."""
    per = -(-rows // state.num_processes)
    first = min(rows, state.process_index * per)
    return first, min(rows, first + per)


def gather_on_main(folder: str | os.PathLike, name: str, tensors: dict[str, torch.Tensor],
                   state) -> Optional[dict[str, torch.Tensor]]:
    """Every process's ``tensors`` (the same keys, rows along dim 0) concatenated in process order, on the main
    process (None on the others), passed through ``folder``: each process writes its part atomically, the main
    process reads them all once every process has written, then deletes them. Results too large for a collective
    (a search's scores for millions of queries) travel this way, as the chunks do."""
    from safetensors.torch import load_file, save_file

    from embedtrain.train.checkpoint import raise_if_any

    if state.num_processes == 1:
        return tensors
    folder = Path(folder)
    part = folder / f"{name}-part-{state.process_index:05d}.safetensors"
    problem = None
    try:
        tmp = part.with_name(f".{part.name}.tmp")
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, part)
    except OSError as err:
        problem = f"{folder}: cannot write {part.name} ({err.strerror or err}); free space or give another --cache"
    raise_if_any(state, problem)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    parts = [folder / f"{name}-part-{r:05d}.safetensors" for r in range(state.num_processes)]
    read = []
    for p in parts:
        try:
            read.append(load_file(str(p)))
        except Exception as err:  # missing or damaged: one line naming it
            raise EmbedtrainError(f"{p}: cannot be read after every process wrote its part ({type(err).__name__}); "
                                  "is the cache folder on a file system every process shares?") from None
    for p in parts:
        p.unlink()
    return {k: torch.cat([r[k] for r in read]) for k in tensors}
