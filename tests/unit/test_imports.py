"""The import direction of STYLE.md, checked by parsing every module."""

import ast
from pathlib import Path

from conftest import REPO

UTILS = {"errors", "registry", "jsonl"}
ALLOWED = {
    "errors": set(),
    "process": set(),  # how a process ends: standard library only
    "registry": {"errors"},
    "jsonl": {"errors"},
    "config": {"errors"},  # the one recipe schema: nothing but the error types
    "data": UTILS | {"config"},
    "models": UTILS | {"config"},
    "losses": UTILS,
    "merge": UTILS | {"config"},
    # the trainer evaluates on local retrieval tasks during training: eval.retrieval only, never mteb
    # and Self Positioning searches merge coefficients through the model's forward pass
    # and the metric-learning trainer evaluates unseen classes through eval.dml; the trainer writes the
    # model card and pushes the finished model (hub never imports train)
    "train": UTILS | {"config", "data", "models", "losses", "merge", "eval.retrieval", "eval.dml", "eval.diagnostics",
              "hub"},
    "eval": UTILS | {"config", "models"},
    "hub": UTILS | {"config", "models"},
    # the plan reads data and builds the model's skeleton with the training code's own pieces (never the reverse)
    "plan": UTILS | {"config", "data", "models", "train"},
    "cli": None,  # may use everything
    "__main__": {"cli"},
    # embedtrain.load and embedtrain.train import their machinery when called (import embedtrain stays light)
    "__init__": {"models", "config", "train"},
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
    modules = sorted((REPO / "embedtrain" / "config").glob("*.py"))
    assert modules and not (REPO / "embedtrain" / "config.py").exists()
    for path in modules:
        assert not any(n.split(".")[0] == "torch" for n in _imports(path)), path


def _import_graph(package: Path, root: Path) -> dict[str, set[str]]:
    """Module name → the modules of the same package it imports anywhere in its body (inside functions too).

    ``from package import name`` counts as importing the submodule ``package.name`` when there is one, else
    the package itself (its ``__init__``).
    """
    files = sorted(package.rglob("*.py"))

    def module_name(path: Path) -> str:
        parts = path.relative_to(root).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    known = {module_name(p) for p in files}
    graph = {}
    for path in files:
        name = module_name(path)
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..models import y
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    if f"{base}.{alias.name}" in known:
                        found.add(f"{base}.{alias.name}")
                    elif base in known:
                        found.add(base)
        graph[name] = found - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles found by a depth-first walk, each as a path that ends where it starts."""
    done: set[str] = set()
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in done:
            return
        for target in sorted(graph[node]):
            visit(target, stack + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return cycles


def test_no_import_cycle_in_models():
    """Modules of embedtrain.models import one another in one direction only: a lower module never
    imports a higher one, not even inside a function (where a cycle hides until some call runs it)."""
    graph = _import_graph(REPO / "embedtrain" / "models", REPO)
    assert graph["embedtrain.models.loading"], "the import parser found nothing; it is broken"
    cycles = _cycles(graph)
    assert not cycles, "import cycles in embedtrain.models:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    """The check above would pass vacuously if it missed imports inside functions or relative imports."""
    package = tmp_path / "embedtrain" / "models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("from .high import g\n")
    (package / "low.py").write_text("def f():\n    from embedtrain.models import high\n")
    (package / "high.py").write_text("from embedtrain.models.low import f\n")
    (package / "other.py").write_text("def h():\n    from . import g\n")
    cycles = _cycles(_import_graph(package, tmp_path))
    assert ["embedtrain.models.high", "embedtrain.models.low", "embedtrain.models.high"] in cycles
    assert ["embedtrain.models.other", "embedtrain.models", "embedtrain.models.high"] not in cycles  # not a cycle
    assert len(cycles) == 1


def test_import_embedtrain_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, embedtrain; assert callable(embedtrain.load); print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"
