"""Run under torchrun with 2 processes: a tiny CLIP with both towers trained takes one GradCache step on its
half of a fixed global batch of emoji (texts chunked by 2, images in one chunk, so the last replay touches the
image tower only); rank 0 saves the loss and every parameter gradient. With no rows: one process, whole batch,
plain step (the reference)."""

import json
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[2])]

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from embedtrain.data.multimodal import MultimodalCollator, read_multimodal_pairs, split_inputs  # noqa: E402
from embedtrain.data.sampler import PlannedBatch  # noqa: E402
from embedtrain.losses import InfoNCELoss  # noqa: E402
from embedtrain.models.clip import architecture_config, load_clip_encoder  # noqa: E402
from embedtrain.process import exit_process  # noqa: E402
from embedtrain.train.step import grad_cache_step, plain_step, replay_sync, to_device  # noqa: E402

ARCH = architecture_config(embed_dim=16, image_size=32, patch_size=8, vision_width=16, vision_layers=1,
                           vision_head_width=8, text_width=16, text_layers=1, text_heads=2, context_length=16)
ROWS = 8
CHUNKS = {"query": 2, "positive": 4, "negative": 4}


def encoder_and_batch(data: str, rows: list[int]):
    torch.manual_seed(0)
    encoder = load_clip_encoder("", architecture=ARCH)
    encoder.set_towers("train", "train")
    encoder.train()
    ds = read_multimodal_pairs(data, "data.train[0]", "emoji", {"query": ("name", None), "positive": (None, "image")},
                               verify=False)
    batch = MultimodalCollator([ds], encoder.inputs)(PlannedBatch(0, tuple(range(ROWS))), rows)
    batch.pop("bad_images"), batch.pop("stop")
    return encoder, batch


def grads(encoder) -> dict:
    return {n: p.grad.detach().clone() for n, p in encoder.named_parameters() if p.grad is not None}


def main(data: str, out_dir: str, distributed: bool) -> None:
    torch.set_num_threads(1)
    loss_fn = InfoNCELoss(temperature=0.07, symmetric=True, gather_across_processes=True)
    if not distributed:  # the reference: one process, the whole batch, no GradCache
        encoder, batch = encoder_and_batch(data, list(range(ROWS)))
        loss = plain_step(encoder, loss_fn, batch, lambda l: l.backward())["loss"]
        save_file(grads(encoder), str(Path(out_dir) / "reference.safetensors"))
        (Path(out_dir) / "reference.json").write_text(json.dumps({"loss": float(loss)}))
        return
    from embedtrain.train.accelerator import build_accelerator

    accelerator = build_accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    half = ROWS // world
    encoder, batch = encoder_and_batch(data, list(range(rank * half, (rank + 1) * half)))
    model = accelerator.prepare(encoder)
    no_sync, after = replay_sync(accelerator, model)
    out = grad_cache_step(model, loss_fn, to_device(batch, accelerator.device), CHUNKS, accelerator.backward, no_sync,
                          split=split_inputs, after_replays=after)
    loss = float(accelerator.reduce(out["loss"].detach(), reduction="mean"))
    g = grads(accelerator.unwrap_model(model))
    if accelerator.is_main_process:
        save_file(g, str(Path(out_dir) / "distributed.safetensors"))
        (Path(out_dir) / "distributed.json").write_text(json.dumps({"loss": loss, "type": str(accelerator.distributed_type)}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] == "2")
    exit_process(0)  # a launched worker ends like the CLI (embedtrain.process: gloo can abort at teardown)
