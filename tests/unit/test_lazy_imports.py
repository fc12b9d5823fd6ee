"""Start-up pays only for what a run uses: heavy libraries are imported where they are needed, not on the way.

Each check runs in a fresh interpreter (this process has imported everything already) and reads sys.modules.
"""

import json
import subprocess
import sys

from conftest import REPO

QUICKSTART = REPO / "recipes" / "minilm" / "wordnet_quickstart.yaml"
# never needed to read a recipe or to set up a text run without experts (each costs seconds or more to import)
NOT_FOR_TEXT = ["sentence_transformers", "mteb", "matplotlib", "faiss", "open_clip", "peft", "sklearn", "timm"]


def imported_after(code: str) -> set[str]:
    """The top-level modules in sys.modules after running ``code`` in a fresh interpreter."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=str(REPO), capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                               "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_command_line_and_a_text_recipe_import_no_machine_learning_library():
    modules = imported_after(f"import embedtrain.cli\nfrom embedtrain.config import load_recipe\n"
                             f"load_recipe({str(QUICKSTART)!r}, ['train.max_steps=1'])")
    heavy = NOT_FOR_TEXT + ["torch", "transformers", "datasets", "accelerate"]
    assert modules.isdisjoint(heavy), sorted(modules & set(heavy))
    assert "embedtrain" in modules  # the check itself ran


def test_the_training_loop_and_a_text_task_import_no_library_the_run_may_not_need():
    modules = imported_after(f"from embedtrain.config import load_recipe\nfrom embedtrain.train.loop import Trainer\n"
                             f"from embedtrain.train.tasks import task_for\n"
                             f"task = task_for(load_recipe({str(QUICKSTART)!r}, []))\n"
                             f"assert type(task).__name__ == 'TextTask'")
    assert modules.isdisjoint(NOT_FOR_TEXT), sorted(modules & set(NOT_FOR_TEXT))
    assert "torch" in modules  # the loop itself needs torch: the check saw the run's imports
