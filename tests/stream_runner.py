"""Run a recipe and record which rows each step trained on, per process: the row ids the streaming tests compare.

    python tests/stream_runner.py RECIPE ROWS_DIR [--resume auto] [--step-seconds S]

Each process appends one JSON line per step to ``ROWS_DIR/rows-<rank>.jsonl``: ``{"step": k, "ids": [...]}`` with
the text hashes of the step's positives (unique per row in the tests' data). A killed run leaves lines for steps
it trained after its last checkpoint; the resumed run writes them again, and the last line of a step counts.
``--step-seconds`` waits after each step, so that a test can kill the run at the step it chose.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from embedtrain.train.loop import Callback


class RowRecorder(Callback):
    def __init__(self, folder: Path, step_seconds: float = 0.0):
        self.folder, self.step, self.file, self.step_seconds = Path(folder), 0, None, step_seconds

    def on_train_begin(self, trainer) -> None:
        self.step = trainer.state.step
        self.folder.mkdir(parents=True, exist_ok=True)
        self.file = (self.folder / f"rows-{trainer.accelerator.process_index}.jsonl").open("a", encoding="utf-8")

    def on_step_begin(self, trainer, batch) -> None:
        self.step += 1
        self.file.write(json.dumps({"step": self.step, "ids": batch["positive_ids"].tolist()}) + "\n")
        self.file.flush()

    def on_step_end(self, trainer, figures) -> None:
        time.sleep(self.step_seconds)

    def on_train_end(self, trainer, result) -> None:
        if self.file is not None:
            self.file.close()


def rows_by_step(folder: Path) -> dict[tuple[int, int], list[int]]:
    """(rank, step) -> the ids that step trained on (the last record of a step wins)."""
    out = {}
    for path in sorted(Path(folder).glob("rows-*.jsonl")):
        rank = int(path.stem.split("-")[1])
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut by the kill
                continue
            out[(rank, entry["step"])] = entry["ids"]
    return out


if __name__ == "__main__":
    import embedtrain

    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("rows")
    parser.add_argument("--resume")
    parser.add_argument("--step-seconds", type=float, default=0.0)
    args = parser.parse_args()
    embedtrain.train(args.recipe, resume=args.resume, callbacks=[RowRecorder(Path(args.rows), args.step_seconds)])
    from embedtrain.process import exit_process

    exit_process(0)  # a launched worker ends like the CLI (embedtrain.process: gloo can abort at teardown)
