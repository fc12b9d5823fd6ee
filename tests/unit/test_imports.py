"""The import direction of STYLE.md, checked by parsing every module."""

import ast
from pathlib import Path

from conftest import REPO

UTILS = {"errors", "registry"}
ALLOWED = {
    "errors": set(),
    "registry": {"errors"},
    "config": UTILS,
    "merge_config": UTILS | {"config", "merge"},
    "multimodal_config": UTILS | {"config"},
    "dml_config": UTILS | {"config"},
    "data": UTILS | {"config"},
    "models": UTILS | {"config"},
    "losses": UTILS,
    "merge": UTILS | {"config"},
    # the trainer evaluates on local retrieval tasks during training: eval.retrieval only, never mteb
    # and Self Positioning searches merge coefficients through the model's forward pass
    # and the metric-learning trainer evaluates unseen classes through eval.dml
    "train": UTILS | {"config", "merge_config", "multimodal_config", "dml_config", "data", "models", "losses", "merge",
                      "eval.retrieval", "eval.dml"},
    "eval": UTILS | {"config", "models"},
    "hub": UTILS | {"config", "models"},
    "cli": None,  # may use everything
    "__main__": {"cli"},
    "__init__": set(),
}
MTEB_MODULES = {"eval/mteb_adapter.py", "eval/local_tasks.py", "eval/mteb_run.py"}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_import_direction():
    package = REPO / "embedtrain"
    problems = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        owner = rel.parts[0].removesuffix(".py")
        allowed = ALLOWED[owner]
        for name in _imports(path):
            if name.split(".")[0] == "mteb" and str(rel) not in MTEB_MODULES:
                problems.append(f"{rel} imports mteb (only {sorted(MTEB_MODULES)} may)")
            if not name.startswith("embedtrain.") or allowed is None:
                continue
            target = name.split(".")[1]
            if target == "cli":
                if owner != "__main__":
                    problems.append(f"{rel} imports embedtrain.cli (nothing may)")
                continue
            dotted = ".".join(name.split(".")[1:3])
            if target != owner and target not in allowed and dotted not in allowed:
                problems.append(f"{rel} imports {name}")
    assert not problems, "\n".join(problems)


def test_config_does_not_import_torch():
    assert not any(n.split(".")[0] == "torch" for n in _imports(REPO / "embedtrain" / "config.py"))
