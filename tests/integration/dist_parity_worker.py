"""Run under torchrun with 2 processes: each takes half of a fixed global batch, trains one step
through Accelerator (DDP on gloo), and rank 0 saves the loss and the parameter gradients."""

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from embedtrain.models import load_text_encoder  # noqa: E402
from embedtrain.process import exit_process  # noqa: E402
from embedtrain.train.accelerator import build_accelerator  # noqa: E402
from embedtrain.train.step import replay_sync  # noqa: E402
from helpers_parity import CONFIGS, grads, make_batch, slice_batch, step  # noqa: E402


def main(model_dir: str, out_dir: str, rows_per_process: int) -> None:
    torch.set_num_threads(1)
    accelerator = build_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2, world
    losses = {"distributed_type": str(accelerator.distributed_type)}
    for name, cfg in CONFIGS.items():
        model = load_text_encoder(model_dir, max_length=32)
        model.freeze_unused_parameters()
        model.train()
        batch = make_batch(model.tokenizer, rows_per_process * world)
        model = accelerator.prepare(model)
        local = slice_batch(batch, rank * rows_per_process, (rank + 1) * rows_per_process)
        no_sync, after = replay_sync(accelerator, model)
        loss = step(model, local, cfg, backward=accelerator.backward, no_sync=no_sync, after_replays=after)
        # report the mean loss over processes, as the trainer logs it
        loss = float(accelerator.reduce(torch.tensor(loss), reduction="mean"))
        g = grads(accelerator.unwrap_model(model))
        if accelerator.is_main_process:
            losses[name] = loss
            save_file({k: v.contiguous() for k, v in g.items()}, str(Path(out_dir) / f"{name}.safetensors"))
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (Path(out_dir) / "losses.json").write_text(json.dumps(losses))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    exit_process(0)  # a launched worker ends like the CLI (embedtrain.process: gloo can abort at teardown)
