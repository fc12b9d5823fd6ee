"""Run under torchrun with 2 processes: each holds 3 rows, and the positive of row 1 has the same text on both
processes (the same id); rank 0 saves both processes' keep masks of the loss's candidate documents."""

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2])]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from embedtrain.losses.in_batch import candidate_documents  # noqa: E402
from embedtrain.process import exit_process  # noqa: E402
from embedtrain.train.accelerator import build_accelerator  # noqa: E402


def main(out: str) -> None:
    accelerator = build_accelerator()
    rank = accelerator.process_index
    ids = torch.tensor([[10, 42, 11], [20, 42, 21]][rank])  # 42: one positive text on both processes
    emb = torch.nn.functional.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(rank)), dim=-1)
    _, targets, keep = candidate_documents(emb, emb, None, ids, None, in_batch_negatives=True,
                                           mask_false_negatives=True, across_processes=True)
    masks = [None, None]
    dist.all_gather_object(masks, {"keep": keep.tolist(), "targets": targets.tolist()})
    if rank == 0:
        Path(out).write_text(json.dumps(masks))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
    exit_process(0)  # a launched worker ends like the CLI (embedtrain.process: gloo can abort at teardown)
