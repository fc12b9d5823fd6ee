"""Instructions per evaluation task: which instruction each task's queries get in ``embedtrain eval``.

A table maps task names to instructions (``{"SciFact": "Given a scientific claim, retrieve documents that
support or refute the claim", ...}``); a task's queries are then embedded as ``Instruct: {instruction}\\nQuery:
{text}`` (:func:`embedtrain.models.instructions.instruction_prefix`), its documents with the model's saved
document prompt, and texts of tasks without a query/document split (STS, classification, clustering) like
queries. Where the table comes from (:func:`resolve_instructions`):

1. ``--instructions FILE``: a YAML or JSON mapping of task name to instruction; ``--instructions nv-embed``: the
   packaged NV-Embed table; ``--instructions none``: no table, every task uses the model's saved prompts;
2. otherwise, for a decoder (NV-Embed) folder: the folder's ``instructions.json``, or the packaged NV-Embed table
   for a folder saved before it had one;
3. otherwise no table (the saved prompts, as trained).

Tasks the table does not cover keep the model's saved prompts; ``embedtrain eval`` prints them and records them in
``results.json``. Checking names against mteb's registry is left to ``mteb_run`` (the one place that asks mteb).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from embedtrain.errors import EmbedtrainError

NO_TABLE = "none"
"""``--instructions none``: use the model's saved prompts for every task."""


@dataclass
class InstructionTable:
    """Instructions by task name, and where they came from (a file, a model folder, the packaged table)."""

    instructions: dict[str, str]
    source: str
    """A file path, ``<folder>/instructions.json`` or ``nv-embed (packaged: arXiv:2405.17428, Table 7)``."""
    used: dict[str, str] = field(default_factory=dict)
    """Instruction of each evaluated task the table covers (filled by :func:`prompts_from_table`)."""
    tasks_without_instruction: list[str] = field(default_factory=list)
    """Evaluated tasks the table does not cover (filled by :func:`prompts_from_table`)."""

    def experiment_name(self) -> str:
        """A stable name for the table (mteb caches results per experiment): a hash of template and instructions."""
        import hashlib

        from embedtrain.models.instructions import QUERY_TEMPLATE

        spec = json.dumps({"template": QUERY_TEMPLATE, "instructions": self.instructions}, sort_keys=True)
        return "instructions-" + hashlib.sha256(spec.encode()).hexdigest()[:12]

    def record(self) -> dict:
        """The entry of results.json: source, query template, the evaluated tasks' instructions, those without."""
        from embedtrain.models.instructions import QUERY_TEMPLATE

        return {"source": self.source, "query_template": QUERY_TEMPLATE, "instructions": dict(self.used),
                "tasks_without_instruction": list(self.tasks_without_instruction)}


def load_instruction_file(path: str | Path) -> dict[str, str]:
    """A ``{task name: instruction}`` mapping from a YAML (.yaml/.yml) or JSON file; one-line errors."""
    import yaml

    path = Path(path)
    flag = f"--instructions {path}"
    if not path.is_file():
        raise EmbedtrainError(f"{flag}: no such file; give a YAML or JSON file mapping task names to instructions, "
                              "or 'nv-embed' / 'none'")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise EmbedtrainError(f"{flag}: cannot be read ({type(err).__name__}); give a UTF-8 text file") from None
    try:
        table = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise EmbedtrainError(f"{flag}: not valid JSON (line {err.lineno})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise EmbedtrainError(f"{flag}: not valid YAML{f' (line {mark.line + 1})' if mark else ''}") from None
    if not isinstance(table, dict) or not table:
        raise EmbedtrainError(f"{flag}: must map task names to instructions, e.g. 'SciFact: Given a scientific claim, "
                              "retrieve documents that support or refute the claim'")
    for task, instruction in table.items():
        if not isinstance(instruction, str) or not instruction.strip():
            raise EmbedtrainError(f"{flag}: the instruction of {task!r} must be a non-empty string "
                                  f"(got {instruction!r})")
    return {str(task): instruction.strip() for task, instruction in table.items()}


def nv_embed_table() -> InstructionTable:
    from embedtrain.models.instructions import NV_EMBED_TABLE, nv_embed_mteb_instructions

    return InstructionTable(nv_embed_mteb_instructions(), f"{NV_EMBED_TABLE} (packaged: arXiv:2405.17428, Table 7)")


def resolve_instructions(spec: Optional[str], model: str) -> Optional[InstructionTable]:
    """The table for evaluating ``model`` (see the module docstring); None means the saved prompts throughout."""
    from embedtrain.config import looks_local, resolve_path
    from embedtrain.models.folders import DECODER, INSTRUCTIONS_FILE, find_model_kind, read_instructions
    from embedtrain.models.instructions import NV_EMBED_TABLE

    if spec == NO_TABLE:
        return None
    if spec == NV_EMBED_TABLE:
        return nv_embed_table()
    if spec is not None:
        return InstructionTable(load_instruction_file(spec), str(spec))
    if not looks_local(model):
        return None
    folder = Path(resolve_path(model))
    if find_model_kind(folder) != DECODER:
        return None
    saved = read_instructions(folder)
    if saved is None:  # saved before decoder folders carried their table
        return nv_embed_table()
    return InstructionTable(saved, str(folder / INSTRUCTIONS_FILE))


def prompts_from_table(table: InstructionTable, task_names: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    """``task_prompts`` for :class:`~embedtrain.eval.mteb_adapter.MtebEncoder`: the query prompt of every evaluated
    task the table covers, and records the others in ``table.tasks_without_instruction``.

    ``task_names`` maps each evaluated task to the names mteb encodes it under (its own name, or the names of
    an aggregate's sub-tasks, which take the aggregate's instruction unless the table names them itself).
    """
    from embedtrain.models.instructions import instruction_prefix

    prompts: dict[str, dict[str, str]] = {}
    missing = []
    table.used = {}
    for task, encoded_as in task_names.items():
        for name in encoded_as:
            instruction = table.instructions.get(name) or table.instructions.get(task)
            if instruction is None:
                missing.append(name)
            else:
                table.used[name] = instruction
                prompts[name] = {"query": instruction_prefix(instruction)}
    table.tasks_without_instruction = list(dict.fromkeys(missing))
    return prompts
