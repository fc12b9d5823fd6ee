"""The plan's memory figure against the measured peak of the same training step, for the CPU recipes.

    python scripts/plan_memory.py --output benchmarks/plan_memory.json

For each recipe, `embedtrain plan` (in process) names the batch with the highest planned memory among the steps
the run trains on (``peak_batch``; epoch plans are deterministic). The recipe then trains up to that step (a
shorter ``train.max_steps``, no evaluation: memory does not depend on either) and that one step (forward, backward,
clipping, optimizer update) is measured by a torch dispatch mode that counts the bytes of every tensor storage an
operation creates and frees (storages an operation writes in place are not new), so the figure is the tensor memory
a GPU allocator would report as its peak (``torch.cuda.max_memory_allocated``): the storages alive before the step
(weights, buffers, optimizer states) plus the highest point of what the step allocates. Python, libraries and the
data are not in it, on either side. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import write_json  # noqa: E402

RECIPES = {
    "quickstart": ("recipes/minilm/wordnet_quickstart.yaml", []),
    "clip_emoji": ("recipes/clip/emoji_clip.yaml", []),
    "tiny_decoder": ("recipes/nv_embed_tiny/stage1.yaml", []),
}
NO_EVAL = ["eval.before_training=false", "train.eval_every=null", "train.save_every=null", "output.plot=false"]


class StorageBytes(TorchDispatchMode):
    """Bytes of the tensor storages created by operations run under it, alive now and at most."""

    def __init__(self):
        super().__init__()
        self.live: set[int] = set()
        self.current = 0
        self.peak = 0

    def _freed(self, key: int, size: int) -> None:
        self.live.discard(key)
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {id(a.untyped_storage()) for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor) and a.device.type != "meta"}
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, size = id(storage), storage.nbytes()
            if key in self.live or key in inputs or size == 0:
                continue  # written in place, or already counted
            self.live.add(key)
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._freed, key, size)
        return out


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            if id(s) not in seen:
                seen.add(id(s))
                total += s.nbytes()
    return total


def measure(recipe_path: str, overrides: list[str], work: Path) -> dict:
    from embedtrain.config import load_recipe
    from embedtrain.plan import make_plan
    from embedtrain.train.loop import Callback, train

    recipe = load_recipe(str(REPO / recipe_path) if not Path(recipe_path).is_absolute() else recipe_path, overrides)
    plan = make_plan(recipe)
    mem = plan["memory_per_device"]
    target = int(mem["peak_batch"])

    class Probe(Callback):
        def __init__(self):
            self.calls, self.mode, self.result = 0, None, None

        def on_step_begin(self, trainer, batch):
            if self.calls == target:
                opt_state = [v for s in trainer.optimizer.state.values() for v in s.values()]
                live = list(trainer.model.parameters()) + list(trainer.model.buffers()) + opt_state + \
                    list(trainer.loss_fn.parameters()) + list(trainer.loss_fn.buffers())
                self.before = storage_bytes(live + [p.grad for p in trainer.model.parameters() if p.grad is not None])
                self.mode = StorageBytes()
                self.mode.__enter__()

        def on_step_end(self, trainer, figures):
            if self.mode is not None:
                self.mode.__exit__(None, None, None)
                self.result = {"before_step": self.before, "step_peak": self.mode.peak,
                               "measured_peak": self.before + self.mode.peak}
                self.mode = None
            self.calls += 1

    probe = Probe()
    out = work / Path(recipe_path).stem
    run = load_recipe(str(REPO / recipe_path), overrides + NO_EVAL + [f"train.max_steps={target + 1}",
                                                                       f"output.dir={out}", "output.overwrite=true"])
    train(run, log=lambda *_: None, callbacks=[probe])
    planned = mem["total"]
    measured = probe.result["measured_peak"]
    return {"recipe": recipe_path, "peak_batch": target, "planned_bytes": planned,
            "planned_parts": {k: v for k, v in mem.items() if type(v) is int and k not in ("total", "peak_batch")},
            "token_lengths": mem["token_lengths"], **probe.result,
            "planned_over_measured": round(planned / measured, 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    os.chdir(REPO)  # recipes name their data relative to the checkout
    torch.set_num_threads(1)  # the figure is memory; one thread keeps the run's tensors the same on any machine
    work = Path(tempfile.mkdtemp(prefix="plan-memory-"))
    report = {"recipes": {name: measure(*RECIPES[name], work) for name in args.recipes}}
    report["largest_error"] = max(abs(r["planned_over_measured"] - 1) for r in report["recipes"].values())
    write_json(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
