"""Run under torchrun with 2 processes: each holds half of fixed query, positive and negative embeddings and takes the
compact loss with an int8 term (InfoNCE gathered across processes); rank 0 saves every process's loss and gradients."""

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from compact_int8_support import ROWS, compact_int8_loss, embeddings  # noqa: E402
from embedtrain.process import exit_process  # noqa: E402
from embedtrain.train.accelerator import build_accelerator  # noqa: E402


def main(out: str) -> None:
    torch.set_num_threads(1)
    accelerator = build_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == 2, world
    half = ROWS // world
    local = {k: v[rank * half:(rank + 1) * half].clone().requires_grad_(True) for k, v in embeddings().items()}
    loss = compact_int8_loss()(**local)["loss"]
    loss.backward()
    parts = [None] * world
    dist.all_gather_object(parts, {"loss": loss.detach(), **{k: v.grad for k, v in local.items()}})
    if rank == 0:
        save_file({f"{r}.{k}": v.contiguous() for r, p in enumerate(parts) for k, v in p.items()}, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_process(0)  # a launched worker ends like the CLI (embedtrain.process: gloo can abort at teardown)
