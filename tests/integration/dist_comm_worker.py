"""Run under `accelerate launch` with 2 processes (DDP or FSDP, from the launcher's config): one training step of
the tiny BERT per step kind (plain, token budget, GradCache), with the loss's own gathers off, while a dispatch mode
adds up the buffer bytes of every collective; rank 0 writes them as JSON, by step kind and collective."""

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from comm_support import ROWS, STEPS  # noqa: E402
from embedtrain.models import load_text_encoder  # noqa: E402
from embedtrain.process import exit_process  # noqa: E402
from embedtrain.train.accelerator import build_accelerator  # noqa: E402
from embedtrain.train.step import replay_sync  # noqa: E402
from helpers_parity import make_batch, slice_batch, step  # noqa: E402

KINDS = {"_allgather_base_": "all_gather", "_reduce_scatter_base_": "reduce_scatter", "allreduce_": "all_reduce"}


class Collectives(TorchDispatchMode):
    """Buffer bytes by collective: the gathered output, the buffer before scattering, the reduced tensor."""

    def __init__(self):
        super().__init__()
        self.bytes: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet.__module__ == "torch.ops.c10d" or str(packet).startswith("c10d."):
            name = str(packet).removeprefix("c10d.")
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            size = max((t.numel() * t.element_size() for t in tensors), default=0)
            key = KINDS.get(name, name)
            self.bytes[key] = self.bytes.get(key, 0) + size
        return func(*args, **(kwargs or {}))


def main(model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    accelerator = build_accelerator()
    rank = accelerator.process_index
    measured = {"distributed_type": str(accelerator.distributed_type).split(".")[-1]}
    for name, cfg in STEPS.items():
        model = load_text_encoder(model_dir, max_length=32)
        model.freeze_unused_parameters()
        model.train()
        batch = make_batch(model.tokenizer, ROWS * 2)
        model = accelerator.prepare(model)
        local = slice_batch(batch, rank * ROWS, (rank + 1) * ROWS)
        no_sync, after = replay_sync(accelerator, model)
        with Collectives() as mode:
            step(model, local, cfg, backward=accelerator.backward, no_sync=no_sync, after_replays=after, gather=False)
        measured[name] = mode.bytes
        accelerator.wait_for_everyone()
    if rank == 0:
        Path(out).write_text(json.dumps(measured))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    exit_process(0)  # a launched worker ends like the CLI (embedtrain.process: gloo can abort at teardown)
