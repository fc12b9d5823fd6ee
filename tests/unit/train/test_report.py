"""`embedtrain report`: one self-contained page with every curve, the warnings, the recipe and the card's tables."""

import base64
import io
import json
import re

from PIL import Image

from embedtrain.cli import main
from embedtrain.train.report import write_report


def write_run(folder, warning_at=20):
    folder.mkdir()
    lines = [{"step": 0, "engine": {"processes": 1}}]
    for step in range(0, 31, 10):
        diag = {"diag/rankme": 100.0 - 2 * step, "diag/uniformity": -3 + 0.05 * step, "diag/alignment": 0.5,
                "diag/random_cosine": 0.1, "diag/similarity_gap": 0.05}
        if step >= warning_at:
            diag["diag/warning"] = "effective rank 60.0 is below 0.7 x its step-0 value 100.0"
        lines.append({"step": step, **diag})
        lines.append({"step": step, "eval/wordnet/ndcg@10": 0.4 + step / 1000, "eval/mean/ndcg@10": 0.4 + step / 1000})
        if step:
            lines.append({"step": step, "loss": 2.0 - step / 30, "lr": 1e-4, "examples_per_s": 50.0 + step})
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + '\n{"step": 31, "lo')
    (folder / "results.json").write_text(json.dumps({"kind": "text", "steps": 30, "baseline": {"mean/ndcg@10": 0.4},
                                                     "final": {"mean/ndcg@10": 0.43}, "seconds": 90.0,
                                                     "diagnostics_probe": {"rows": 256, "excluded_training_rows": 300}}))
    (folder / "recipe.yaml").write_text("kind: text\ntrain:\n  lr: 0.0001  # <b>not markup</b>\n")
    (folder / "model").mkdir()
    (folder / "model" / "README.md").write_text(
        "---\ntags: [x]\n---\n\n# m\n\n## Model details\n\n| Property | Value |\n| --- | --- |\n| Pooling | `mean` |\n\n"
        "## Usage\n\nno table here\n")
    return folder


def test_the_page_holds_every_plot_as_a_png_and_the_run_s_text(tmp_path):
    path, plots = write_report(write_run(tmp_path / "run"))
    page = path.read_text()
    ids = [p["id"] for p in plots]
    assert ids == ["loss", "lr", "throughput-examples_per_s", "diag-rankme", "diag-uniformity", "diag-alignment",
                   "diag-random_cosine", "diag-similarity_gap", "eval-ndcg@10"]
    sources = dict(re.findall(r'<img id="plot-([^"]+)" alt="[^"]*" src="([^"]+)"', page))
    assert list(sources) == ids
    for src in sources.values():
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.format == "PNG" and image.size[0] > 100
    assert "http://" not in page and "https://" not in page  # nothing to fetch: opens without a network
    assert "effective rank 60.0 is below" in page and page.count("<tr><th>20</th>") == 1  # the warnings by step
    assert "<th>Property</th>" in page and "<code>mean</code>" in page and "no table here" not in page
    assert "&lt;b&gt;not markup&lt;/b&gt;" in page  # the recipe is shown as text
    assert "256 pairs held out" in page
    assert "1 line(s) not JSON, left out" in page  # a line cut off by a killed process is said, not fatal


def test_the_command_writes_the_page_and_refuses_a_folder_without_metrics(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    assert main(["report", str(run), "--output", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").is_file() and "9 plots" in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
