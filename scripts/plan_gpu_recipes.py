"""The plans of the GPU recipes on one node of 8 x 80 GB GPUs, for the README's "Before you rent GPUs".

    python scripts/plan_gpu_recipes.py --output benchmarks/plan_gpu_recipes.json

Each recipe is planned as `embedtrain plan RECIPE --accelerate-config recipes/accelerate/multi_gpu.yaml
--device-memory 80 --model-config recipes/model_configs/<model> --lengths max` would plan it, against local stand-ins
of its data (the real schemas and label sets, tiny texts: tests/plan_support.py), so every text is taken at the
recipe's token limit (`--lengths max`: the worst case, which does not depend on the stand-ins' texts). The data
figures of the stand-ins are left out; parameters, memory per GPU, FLOPs and time per step are the recipe's own.
Also the same recipes under the FSDP config (recipes/accelerate/fsdp.yaml). The one-GPU recipe (LoRA on
Qwen3-Embedding-0.6B) is planned on one 80 GB GPU only (no accelerate config: `embedtrain train` without a
launcher). Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "tests"))
from _bench_common import write_json  # noqa: E402

RECIPES = ["recipes/mistral-7b/nv_embed_stage1.yaml", "recipes/mistral-7b/nv_embed_stage2.yaml",
           "recipes/qwen2-vl-2b/vlm2vec.yaml", "recipes/qwen3-embedding-8b/lora_msmarco.yaml"]
ENGINES = {"ddp": "recipes/accelerate/multi_gpu.yaml", "fsdp": "recipes/accelerate/fsdp.yaml"}
ONE_GPU = ["recipes/qwen3-embedding-0.6b/lora_msmarco.yaml"]


def main(argv=None) -> int:
    from dataclasses import replace

    from plan_support import build_stand_ins, plan_inputs

    from embedtrain.config import load_recipe
    from embedtrain.plan import make_plan

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    os.chdir(REPO)
    stand_ins = build_stand_ins(Path(tempfile.mkdtemp(prefix="plan-stand-ins-")))
    report = {"lengths": "max", "device_memory_gb": 80, "plans": {}}
    for path in RECIPES:
        overrides, settings = plan_inputs(path, stand_ins)
        for engine, config in ENGINES.items():
            plan = make_plan(load_recipe(path, overrides),
                             replace(settings, accelerate_config=str(REPO / config), lengths="max"))
            plan.pop("data")  # the stand-ins' rows say nothing about the real data
            report["plans"][f"{path}:{engine}"] = plan
    for path in ONE_GPU:
        overrides, settings = plan_inputs(path, stand_ins)
        plan = make_plan(load_recipe(path, overrides), replace(settings, lengths="max"))
        plan.pop("data")
        report["plans"][f"{path}:one_gpu"] = plan
    write_json(report, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
