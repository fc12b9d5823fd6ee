"""scripts/prepare_mmeb.py on a small MMEB-train-shaped folder, then the GPU recipe's code path on a tiny Qwen2-VL."""

import json
import shutil
import subprocess
import sys

import yaml

from embedtrain.cli import main

from conftest import REPO
from multimodal_support import EMOJI, emoji_rows, tiny_vlm  # noqa: F401  (fixture)


def write_mmeb(root, n=12):
    import datasets

    (root / "images" / "emoji").mkdir(parents=True)
    rows = emoji_rows(n, 300)
    for r in rows:
        shutil.copy(EMOJI / r["image"], root / "images" / "emoji" / r["image"].split("/")[-1])
    image = lambda r: "images/emoji/" + r["image"].split("/")[-1]  # noqa: E731
    subsets = {
        "MSCOCO_i2t": [{"qry": "<|image_1|>\nFind a caption for the emoji", "qry_image_path": image(r),
                        "pos_text": r["name"], "pos_image_path": "", "neg_text": "", "neg_image_path": ""} for r in rows],
        "MSCOCO_t2i": [{"qry": f"Find the emoji called: {r['name']}", "qry_image_path": "",
                        "pos_text": "<|image_1|>\nRepresent the given image.", "pos_image_path": image(r),
                        "neg_text": "", "neg_image_path": ""} for r in rows],
    }
    for name, data in subsets.items():
        (root / name).mkdir()
        datasets.Dataset.from_list(data).to_parquet(str(root / name / "original-00000-of-00001.parquet"))
        paraphrased = [dict(d, qry="paraphrased " + d["qry"]) for d in data]
        datasets.Dataset.from_list(paraphrased).to_parquet(str(root / name / "diverse_instruction-00000.parquet"))


def test_convert_then_train_the_gpu_recipe_on_a_tiny_model(tiny_vlm, tmp_path):
    write_mmeb(tmp_path / "mmeb")
    out = tmp_path / "data"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_mmeb.py"), "--mmeb-train",
                             str(tmp_path / "mmeb"), "--images", str(tmp_path / "mmeb"), "--output", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    i2t = [json.loads(line) for line in (out / "MSCOCO_i2t.jsonl").read_text().splitlines()]
    assert i2t[0]["query_text"] == "\nFind a caption for the emoji"  # the marker goes, the template puts the image there
    assert i2t[0]["query_image"] == str(tmp_path / "mmeb" / "images" / "emoji" / "0300.png")
    assert "positive_image" not in i2t[0]
    entries = yaml.safe_load((out / "datasets.yaml").read_text())["train"]
    assert [e["name"] for e in entries] == ["MSCOCO_i2t", "MSCOCO_t2i"]
    assert entries[1]["positive_image_column"] == "positive_image" and "query_image_column" not in entries[1]

    # the shipped GPU recipe, shrunk to a CPU: tiny model, float32, small batch, same code path
    run = tmp_path / "run"
    assert main(["train", str(REPO / "recipes" / "qwen2-vl-2b" / "vlm2vec.yaml"), f"model.name_or_path={tiny_vlm}",
                 f"data.train={json.dumps(entries)}", "model.dtype=float32", 'train.mixed_precision="no"',
                 "model.image_max_pixels=1024", "data.batch_size=4", "data.num_workers=0", "train.max_steps=2",
                 "train.save_every=null", f"output.dir={run}"]) == 0
    assert (run / "model" / "modules.json").is_file()
    assert json.loads((run / "results.json").read_text())["steps"] == 2
