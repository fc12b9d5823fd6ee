"""Run under accelerate launch with 2 processes: trains a recipe with data.mined_negatives; every process writes
what it saw to <out>/rank<r>.json: the ids of its slice of each step's batch, the mined candidates it holds at the
end, and whether embedding texts split across the processes (encode_shared) equals embedding them all here."""

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2])]

import yaml  # noqa: E402

from embedtrain.config import recipe_from_dict  # noqa: E402
from embedtrain.process import exit_process  # noqa: E402
from embedtrain.train.callbacks import Callback  # noqa: E402
from embedtrain.train.loop import train  # noqa: E402
from embedtrain.train.mining import encode_shared  # noqa: E402

TEXTS = [f"small red tree {i} " * (1 + i % 5) for i in range(13)]  # 13: not a multiple of the 2 processes


class Record(Callback):
    def __init__(self):
        self.batches, self.seen = [], {}

    def on_step_begin(self, trainer, batch):
        self.batches.append({k: batch[k].tolist() for k in ("positive_ids", "negative_ids")})

    def on_train_loop_end(self, trainer, step):
        accelerator = trainer.accelerator
        model = accelerator.unwrap_model(trainer.model)
        shared = encode_shared(lambda t: model.encode(t, role="document"), TEXTS, accelerator)
        whole = model.encode(TEXTS, role="document")  # every process embeds every text: the same forward calls
        self.seen = {
            "rank": accelerator.process_index,
            "batches": self.batches,
            "candidates": trainer.task.collator.mined[0].candidates.tolist(),
            "mined_at": trainer.task.collator.mined[0].step,
            # float32 sums over 32 dimensions, texts batched with different padding: a few ulps
            "encode_shared_max_diff": float((shared - whole).abs().max()),
        }


def main(recipe_path: str, out: str) -> None:
    record = Record()
    train(recipe_from_dict(yaml.safe_load(Path(recipe_path).read_text())), log=lambda *_: None, callbacks=[record])
    Path(out, f"rank{record.seen['rank']}.json").write_text(json.dumps(record.seen))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    exit_process(0)  # a launched worker ends like the CLI (embedtrain.process: gloo can abort at teardown)
