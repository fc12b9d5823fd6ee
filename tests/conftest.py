"""Shared fixtures: tiny models built from configs and small data written on the fly (all offline)."""

from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests draw the same examples on every run (derandomize) and do not fail because a shared, busy CPU
# made example generation slow (too_slow): a failure is then about the code, never about the draw or the load.
settings.register_profile("embedtrain", derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("embedtrain")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# every process a test launches (torchrun, accelerate launch, the CLI) prints the Python stack of each thread if it
# dies on a signal (SIGABRT, SIGSEGV): a crash in a child then says where it happened, not only its exit code
os.environ.setdefault("PYTHONFAULTHANDLER", "1")

REPO = Path(__file__).resolve().parents[1]

WORDS = (
    "the a of and to in is for on with as by an be or at from that this it are was which not have "
    "small large animal plant tree fruit water river city music sound color red blue green light dark "
    "fast slow person child house road tool machine computer program data network word language number "
    "make take give find open close move run write read sing play build break cut grow"
).split()


def write_vocab(path: Path) -> Path:
    """A WordPiece vocabulary that can spell any lowercase text (characters as a fallback)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = specials + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + WORDS
    seen, vocab = set(), []
    for t in tokens:
        if t not in seen:
            seen.add(t)
            vocab.append(t)
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return path


def build_tiny_bert(folder: Path, dropout: float = 0.1, seed: int = 0) -> Path:
    """A 2-layer, 32-wide BERT with a real tokenizer, saved as a transformers folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(folder / "vocab.txt")
    tokenizer = BertTokenizer(vocab=str(vocab), do_lower_case=True)
    config = BertConfig(
        vocab_size=len(vocab.read_text().splitlines()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=128, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_pairs(path: Path, rows: int, seed: int = 0, negatives: bool = True) -> Path:
    """Query/positive/negative rows where the positive shares words with the query (learnable)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            key = [rng.choice(WORDS) for _ in range(3)]
            row = {
                "anchor": " ".join(key) + " " + sentence(rng, rng.randint(1, 8)),
                "positive": " ".join(reversed(key)) + f" {i}",
            }
            if negatives:
                row["negative"] = sentence(rng, 3) + f" n{i}"
            f.write(json.dumps(row) + "\n")
    return path


def write_beir(folder: Path, n_docs: int = 40, n_queries: int = 12, seed: int = 1) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = [(f"d{i}", sentence(rng, 4)) for i in range(n_docs)]
    with (folder / "corpus.jsonl").open("w") as f:
        for did, text in docs:
            f.write(json.dumps({"_id": did, "title": "", "text": text}) + "\n")
    with (folder / "queries.jsonl").open("w") as f, (folder / "qrels.tsv").open("w") as q:
        q.write("query-id\tcorpus-id\tscore\n")
        for i in range(n_queries):
            did, text = docs[i]
            f.write(json.dumps({"_id": f"q{i}", "text": " ".join(reversed(text.split()))}) + "\n")
            q.write(f"q{i}\t{did}\t1\n")
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_bert_no_dropout(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert-nodrop"), dropout=0.0)


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs") / "train.jsonl", rows=256)


@pytest.fixture(scope="session")
def beir_dir(tmp_path_factory) -> Path:
    return write_beir(tmp_path_factory.mktemp("beir") / "eval")


def tiny_recipe(model: Path, data: Path, out: Path, beir: Path | None = None, **sections) -> dict:
    """A recipe dict for a few fast steps on the tiny model."""
    recipe = {
        "model": {"name_or_path": str(model), "max_length": 32},
        "data": {"train": [{"path": str(data), "name": "pairs", "negative_columns": ["negative"]}], "batch_size": 8},
        "loss": {"name": "infonce", "temperature": 0.05},
        "train": {"lr": 1e-3, "max_steps": 6, "warmup_ratio": 0.0, "log_every": 1, "seed": 3},
        "eval": {"tasks": [{"path": str(beir), "name": "tiny"}] if beir else []},
        "output": {"dir": str(out), "plot": False},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests with one intra-op thread (tiny tensors gain nothing from a second)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logged_steps(run_dir: Path) -> list[int]:
    """Steps in metrics.jsonl while a process may be appending to it (a cut line is ignored)."""
    path = run_dir / "metrics.jsonl"
    steps = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if "loss" in entry:
                steps.append(entry["step"])
    return steps


def subprocess_env(**extra) -> dict:
    """The environment of a training command a test starts: one thread, unbuffered (what a run printed before it
    was killed is in its log), the repository and tests importable, no launcher config or test pause inherited."""
    from embedtrain.train.checkpoint import PAUSE_ENV
    from embedtrain.train.chunked_embeddings import PAUSE_ENV as CHUNK_PAUSE_ENV

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
    env.pop("ACCELERATE_CONFIG_FILE", None)
    env.pop(PAUSE_ENV, None)
    env.pop(CHUNK_PAUSE_ENV, None)
    env.update(extra)
    return env


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process it started, wherever their sessions are: torch's launcher starts each
    worker in a session of its own, out of reach of a kill of the launcher's process group."""
    import psutil  # accelerate depends on it

    try:
        root = psutil.Process(pid)
        family = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for proc in family:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=60)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a launcher's rendezvous (a fixed port can still
    be held by the previous launch's closing sockets)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(config: str | Path) -> list[str]:
    """The start of an ``accelerate launch`` command with ``config`` (a file name in recipes/accelerate, or a path)
    and a free rendezvous port; the script or ``-m module`` and its arguments follow."""
    import shutil
    import sys

    path = Path(config) if Path(config).is_absolute() else REPO / "recipes" / "accelerate" / config
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    return [accelerate, "launch", "--config_file", str(path), "--main_process_port", str(free_port())]
