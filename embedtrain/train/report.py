"""``embedtrain report RUN_DIR``: one self-contained HTML page about a training run.

Read from the run's folder: metrics.jsonl (loss, learning rate, throughput, the probe diagnostics and
their warnings, evaluation scores, all over steps), results.json, recipe.yaml and the model card's tables
(model/README.md). Every plot is a PNG inside the page as a data URI, so the file opens anywhere without
a server or network.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Optional

from embedtrain.errors import EmbedtrainError

DIAGNOSTICS = {
    "rankme": ("probe: RankMe", "effective rank of the probe embeddings; a fall means collapse"),
    "uniformity": ("probe: uniformity", "log mean Gaussian potential; lower is more uniform, 0 is collapse"),
    "alignment": ("probe: alignment", "mean squared distance of positive pairs; lower is better"),
    "random_cosine": ("probe: random-pair cosine", "mean cosine of random pairs; near 1 is a crowded cone"),
    "similarity_gap": ("probe: similarity gap", "positive minus hardest in-probe negative cosine"),
}
"""Each diagnostic's plot title and caption (red lines mark the steps with a warning)."""


def read_metrics(path: Path) -> tuple[dict[int, dict], int]:
    """metrics.jsonl merged per step (a resumed run's later line wins for a repeated key), and the number of
    lines that are not JSON (a line a running or killed process left half-written)."""
    steps: dict[int, dict] = {}
    unreadable = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            unreadable += 1
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            steps.setdefault(entry["step"], {}).update(entry)
    return steps, unreadable


def series(steps: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    points = [(s, e[key]) for s, e in sorted(steps.items())
              if isinstance(e.get(key), (int, float)) and not isinstance(e.get(key), bool)]
    return [p[0] for p in points], [p[1] for p in points]


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _plot(title: str, lines: dict[str, tuple[list[int], list[float]]], ylabel: str,
          warnings: Optional[list[int]] = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    for label, (x, y) in lines.items():
        ax.plot(x, y, marker="o" if len(x) < 40 else None, markersize=3, label=label)
    for i, step in enumerate(warnings or []):
        ax.axvline(step, color="tab:red", alpha=0.35, linewidth=1, label="warning" if i == 0 else None)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(lines) > 1 or warnings:
        ax.legend(fontsize=8)
    return _png(fig)


def build_plots(steps: dict[int, dict]) -> list[dict]:
    """Each plot as {id, title, src (a data URI)}; plots with no figures in the metrics are left out."""
    plots = []
    keys = {k for e in steps.values() for k in e}

    def add(plot_id: str, title: str, lines: dict, ylabel: str, warnings=None, caption: str = "") -> None:
        lines = {label: xy for label, xy in lines.items() if xy[0]}
        if lines:
            plots.append({"id": plot_id, "title": title, "caption": caption or title,
                          "src": _plot(title, lines, ylabel, warnings)})

    add("loss", "training loss", {"loss": series(steps, "loss")}, "loss")
    add("lr", "learning rate", {"lr": series(steps, "lr")}, "learning rate")
    for key in sorted(k for k in keys if k.endswith("_per_s")):
        add(f"throughput-{key}", f"throughput ({key.replace('_', ' ')})", {key: series(steps, key)}, key)
    warned = [s for s, e in sorted(steps.items()) if "diag/warning" in e]
    for name, (title, caption) in DIAGNOSTICS.items():
        add(f"diag-{name}", title, {name: series(steps, f"diag/{name}")}, name, warned, f"{title}: {caption}")
    evals = sorted(k for k in keys if k.startswith("eval/"))
    tasks = {k.split("/")[1] for k in evals}
    metrics: dict[str, dict] = {}
    for key in evals:
        parts = key.split("/")[1:]
        if parts[0] == "mean" and len(tasks) <= 2:  # one task (+ its mean): the mean repeats it
            continue
        metrics.setdefault(parts[-1], {})["/".join(parts[:-1])] = series(steps, key)
    for metric, lines in metrics.items():
        add(f"eval-{metric}", f"evaluation: {metric}", lines, metric)
    return plots


def model_card_tables(model_dir: Path) -> str:
    """The model card's sections that hold a table (model details, evaluation), as HTML."""
    from markdown_it import MarkdownIt

    card = model_dir / "README.md"
    if not card.is_file():
        return ""
    text = card.read_text(encoding="utf-8")
    if text.startswith("---"):  # the Hub's metadata block
        text = text.split("---", 2)[-1]
    out = []
    for section in text.split("\n## ")[1:]:
        heading, _, body = section.partition("\n")
        table = [line for line in body.splitlines() if line.startswith("|")]
        if table:
            out.append(f"<h3>{html.escape(heading.strip())}</h3>\n"
                       + MarkdownIt("commonmark").enable("table").render("\n".join(table)))
    return "\n".join(out)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ margin: 0; }} img {{ max-width: 100%; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }} td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; }}
pre {{ background: #f6f6f6; padding: 1em; overflow-x: auto; }} .warning {{ color: #b00; }}
</style></head><body>
<h1>{title}</h1>
{summary}
<h2>Curves</h2>
<div class="plots">
{plots}
</div>
<h2>Diagnostics warnings</h2>
{warnings}
<h2>Model card</h2>
{card}
<h2>Recipe</h2>
<pre>{recipe}</pre>
</body></html>
"""


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows) + "</table>"


def write_report(run_dir: Path, output: Optional[Path] = None) -> tuple[Path, list[dict]]:
    """Write the page (default ``<run_dir>/report.html``); returns its path and the plots it holds."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise EmbedtrainError(f"report: {metrics} not found; give the output.dir of a training run")
    steps, unreadable = read_metrics(metrics)
    plots = build_plots(steps)
    results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
    summary = [("run", str(run_dir)), ("kind", str(results.get("kind", "?"))),
               ("steps", str(results.get("steps", max(steps, default=0))))]
    if not results:
        summary.append(("results.json", "not written yet (the run did not finish)"))
    if unreadable:
        summary.append(("metrics.jsonl", f"{unreadable} line(s) not JSON, left out (cut off while being written?)"))
    for phase in ("baseline", "final"):
        scores = results.get(phase) or {}
        summary += [(f"{phase} {k}", f"{v:.4f}") for k, v in scores.items() if isinstance(v, (int, float))]
    if "seconds" in results:
        summary.append(("time", f"{results['seconds'] / 60:.1f} min"))
    probe = results.get("diagnostics_probe")
    if probe:
        summary.append(("diagnostics probe", f"{probe['rows']} pairs held out; "
                                             f"{probe['excluded_training_rows']} training rows removed"))
    warned = [(str(s), e["diag/warning"]) for s, e in sorted(steps.items()) if "diag/warning" in e]
    warnings = (f'<div class="warning">{_table(warned)}</div>' if warned
                else "<p>none</p>" if any("diag/rankme" in e for e in steps.values())
                else "<p>no diagnostics in metrics.jsonl</p>")
    figures = "\n".join(f'<figure><img id="plot-{p["id"]}" alt="{html.escape(p["title"])}" src="{p["src"]}">'
                        f'<figcaption>{html.escape(p["caption"])}</figcaption></figure>' for p in plots)
    recipe = run_dir / "recipe.yaml"
    page = PAGE.format(
        title=html.escape(f"embedtrain run: {run_dir.name}"), summary=_table(summary), plots=figures or "<p>no figures</p>",
        warnings=warnings, card=model_card_tables(run_dir / "model") or "<p>no model card (model/README.md)</p>",
        recipe=html.escape(recipe.read_text(encoding="utf-8")) if recipe.is_file() else "recipe.yaml not found",
    )
    output = Path(output) if output else run_dir / "report.html"
    output.write_text(page, encoding="utf-8")
    return output, [{"id": p["id"], "title": p["title"]} for p in plots]
