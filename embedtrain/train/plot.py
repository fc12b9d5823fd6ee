"""A PNG of the loss and evaluation curves from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(metrics_path: Path, png_path: Path, metric: str = "ndcg@10") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest: dict[tuple[str, int], float] = {}
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            for k, v in entry.items():
                if k != "step" and isinstance(v, (int, float)):
                    latest[(k, entry["step"])] = v  # a resumed run's later line wins

    def series(key: str) -> tuple[list[int], list[float]]:
        points = sorted((s, v) for (k, s), v in latest.items() if k == key)
        return [p[0] for p in points], [p[1] for p in points]

    eval_keys = sorted({k for k, _ in latest if k.startswith("eval/") and k.endswith(metric) and "/mean/" not in k})
    fig, axes = plt.subplots(1, 2 if eval_keys else 1, figsize=(11 if eval_keys else 6, 4), squeeze=False)
    steps, loss = series("loss")
    axes[0][0].plot(steps, loss, color="tab:blue")
    axes[0][0].set(title="training loss", xlabel="step", ylabel="loss")
    axes[0][0].grid(alpha=0.3)
    if eval_keys:
        for key in eval_keys:
            s, v = series(key)
            axes[0][1].plot(s, [100 * x for x in v], marker="o", label=key[len("eval/"):])
        axes[0][1].set(title=f"evaluation ({metric})", xlabel="step", ylabel=f"{metric} x 100")
        axes[0][1].legend()
        axes[0][1].grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png_path)
    return png_path
