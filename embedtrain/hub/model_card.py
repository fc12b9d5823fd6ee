"""Model cards for trained encoders: Hub metadata plus a readable body.

:func:`render_model_card` turns a :class:`ModelCardData` into README.md text. The YAML metadata
(library, pipeline tag, tags, base model, datasets, license, language and an MTEB-style
``model-index`` of evaluation results) is built with huggingface_hub's ``ModelCardData`` and
``EvalResult``, so ``ModelCard.load`` and ``metadata_load`` read it back. The body comes from the
Jinja template ``model_card_template.md`` next to this module; that template must start with the
``---`` / ``{{ card_data }}`` / ``---`` block, because huggingface_hub takes metadata only from a
leading YAML block and otherwise leaves the card without any (it merely logs a warning).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import yaml
from huggingface_hub import EvalResult, ModelCard
from huggingface_hub import ModelCardData as HubCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from embedtrain.errors import EmbedtrainError

HUB_URL = "https://huggingface.co"
MTEB_SOURCE_URL = "https://github.com/embeddings-benchmark/mteb/"
DEFAULT_TAGS = ("sentence-transformers", "embedtrain", "feature-extraction", "sentence-similarity")
EVAL_SOURCES = ("embedtrain", "mteb")

# MTEB task types → Hub task ids, as MTEB itself writes them into a model-index.
HUB_TASK_TYPES = {
    "Retrieval": "text-retrieval",
    "InstructionRetrieval": "text-retrieval",
    "Reranking": "text-ranking",
    "InstructionReranking": "text-ranking",
    "STS": "sentence-similarity",
    "Classification": "text-classification",
    "MultilabelClassification": "text-classification",
    "Clustering": "text-classification",
    "PairClassification": "text-classification",
    "BitextMining": "translation",
    "Summarization": "summarization",
}


def _citation(key: str) -> str:
    """The BibTeX entry ``key`` of citations.bib (beside this module)."""
    text = (Path(__file__).parent / "citations.bib").read_text(encoding="utf-8")
    for entry in re.split(r"\n(?=@)", text):
        if re.match(r"@\w+\{" + re.escape(key) + ",", entry):
            return entry.strip()
    raise KeyError(f"citations.bib has no entry {key!r}")  # a bug in this package


SENTENCE_BERT_CITATION = _citation("reimers-2019-sentence-bert")
INFONCE_CITATION = _citation("oord2018representation")
CLIP_CITATION = _citation("radford2021learning")
SIGLIP_CITATION = _citation("zhai2023sigmoid")
GRADCACHE_CITATION = _citation("gao2021scaling")

LOSS_CITATIONS = {"infonce": INFONCE_CITATION, "clip": CLIP_CITATION, "siglip": SIGLIP_CITATION}
"""BibTeX by loss name; a loss without its own ``citation`` gets the one under its (lower-cased) name."""


@dataclass
class EvalEntry:
    """One metric of one evaluation task, as shown in the card and in its ``model-index``.

    ``value`` (and ``baseline``) are on the 0-1 scale, as embedtrain and MTEB 2 compute them, and go
    into the metadata unchanged (no x100).
    """

    task_name: str
    """Evaluation task, e.g. 'SciFact' or 'wordnet-eval'."""
    dataset_id: str
    """Hub dataset id ('mteb/scifact') or the local task's name; the model-index dataset type."""
    metric_name: str
    """MTEB-style metric id such as 'ndcg_at_10' ('ndcg@10' is accepted and stored as 'ndcg_at_10')."""
    value: float
    """Score of the trained model, 0-1."""
    task_type: str = "Retrieval"
    """MTEB task type; written as the model-index task name, its Hub task id as the task type."""
    split: str = "test"
    """Evaluated split."""
    dataset_name: Optional[str] = None
    """Readable dataset name for the model-index (defaults to task_name)."""
    dataset_config: Optional[str] = None
    """Dataset subset (MTEB's hf_subset), if any."""
    dataset_revision: Optional[str] = None
    """Dataset revision (commit), if known."""
    main_score: bool = False
    """This metric is the task's main score (MTEB's main_score; embedtrain's checkpoint metric)."""
    baseline: Optional[float] = None
    """Score of the base model before training, 0-1; shown in the body only."""
    source: str = "embedtrain"
    """Who computed the score: 'embedtrain' (its own evaluation) or 'mteb'."""
    source_url: Optional[str] = None
    """Link for the model-index source; defaults to MTEB's repository for 'mteb' and to the model's
    Hub page for 'embedtrain' (when ModelCardData.repo_id is set; the Hub needs a URL with a source)."""

    def __post_init__(self) -> None:
        if self.source not in EVAL_SOURCES:
            raise ValueError(f"EvalEntry.source must be one of {EVAL_SOURCES}, got {self.source!r}")
        self.metric_name = self.metric_name.replace("@", "_at_")
        self.value = float(self.value)
        if self.baseline is not None:
            self.baseline = float(self.baseline)


@dataclass
class ModelCardData:
    """Everything a model card says about a trained encoder.

    Only ``model_name`` is required; sections without data are left out of the card.
    """

    model_name: str
    """Title of the card and model-index name."""
    base_model: Optional[str] = None
    """Model the training started from; in the metadata only if it is a Hub id, not a local folder."""
    datasets: list[str] = field(default_factory=list)
    """Hub dataset ids trained on (metadata and body)."""
    local_datasets: list[str] = field(default_factory=list)
    """Names of local training files (body only: the metadata takes Hub ids only)."""
    license: str = "apache-2.0"
    """Hub license id."""
    language: list[str] = field(default_factory=lambda: ["en"])
    """ISO language codes."""
    tags: list[str] = field(default_factory=list)
    """Hub tags; DEFAULT_TAGS are always added in front."""
    pipeline_tag: str = "sentence-similarity"
    """Hub pipeline tag."""
    library_name: str = "sentence-transformers"
    """Library that loads the model."""
    repo_id: Optional[str] = None
    """Hub repo id (user/name) the model is pushed to; used in the usage snippet."""
    summary: Optional[str] = None
    """Opening paragraph; a generated one if unset."""
    recipe: Optional[dict] = None
    """The resolved recipe as plain data (embedtrain.config.to_dict), shown as YAML."""
    losses: list[dict] = field(default_factory=list)
    """One dict per loss: 'name', optional 'description', 'equation' (LaTeX), 'citation' (BibTeX)."""
    hyperparameters: dict = field(default_factory=dict)
    """Name → value, shown as a table."""
    hardware: Optional[str] = None
    """Hardware used, e.g. '1 x NVIDIA H100 80GB'."""
    training_time_s: Optional[float] = None
    """Wall-clock training time in seconds."""
    embedding_dim: Optional[int] = None
    """Length of the output vectors."""
    max_length: Optional[int] = None
    """Token limit of the inputs."""
    pooling: Optional[str] = None
    """Pooling over token states ('mean', 'cls', 'last_token')."""
    normalize: Optional[bool] = None
    """Whether outputs are L2-normalised."""
    similarity: str = "cosine"
    """Similarity function saved with the model."""
    prompts: dict[str, str] = field(default_factory=dict)
    """Prompts saved with the model, by name ('query', 'document', ...)."""
    eval_results: list[EvalEntry] = field(default_factory=list)
    """Evaluation results."""
    instructions: dict[str, str] = field(default_factory=dict)
    """Instruction per evaluation task saved with the model (its instructions.json), listed in the card."""
    citations: dict[str, str] = field(default_factory=dict)
    """Extra BibTeX entries by title (e.g. {'GradCache': GRADCACHE_CITATION})."""
    compact: Optional[dict] = None
    """Prefixes and precisions the model was trained for (its compact_embeddings.json), or None."""
    lora: Optional[dict] = None
    """The LoRA adapter it was trained with (``r``, ``alpha``, ``target_modules``, ``folder``), or None."""
    custom_modules: bool = False
    """The folder uses embedtrain's own module classes (decoder backbone, latent attention, experts):
    loading it needs embedtrain installed and trust_remote_code=True."""

    def __post_init__(self) -> None:
        self.tags = list(dict.fromkeys([*DEFAULT_TAGS, *self.tags]))


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def render_model_card(data: ModelCardData) -> str:
    """README.md text for ``data``: YAML metadata (with model-index) followed by the body."""
    metadata = _hub_card_data(data)
    text = _template().render(card_data=metadata.to_yaml(), **_body_vars(data))
    card = ModelCard(text)
    if card.data.get("library_name") != data.library_name:
        raise RuntimeError("model_card_template.md lost its leading '{{ card_data }}' YAML block")
    return str(card)


def write_model_card(model_dir: str | os.PathLike, data: ModelCardData) -> Path:
    """Write the card as ``model_dir/README.md`` atomically (replacing any README there) and return its path."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise EmbedtrainError(f"{folder}: model folder not found; save the model before writing its card")
    text = render_model_card(data)
    target = folder / "README.md"
    tmp = folder / f".README.md.{uuid.uuid4().hex}.tmp"  # not mkstemp: keep the umask's permissions
    try:
        with open(tmp, "x", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _hub_card_data(data: ModelCardData) -> HubCardData:
    """The metadata block, built with huggingface_hub so that it parses back exactly."""
    results = [_eval_result(entry, data.repo_id) for entry in data.eval_results]
    return HubCardData(
        base_model=data.base_model if _is_hub_id(data.base_model) else None,
        datasets=list(data.datasets) or None,
        language=list(data.language) or None,
        library_name=data.library_name,
        license=data.license,
        pipeline_tag=data.pipeline_tag,
        tags=list(data.tags),
        model_name=data.model_name if results else None,  # only the model-index uses it
        eval_results=results or None,
    )


def _eval_result(entry: EvalEntry, repo_id: Optional[str]) -> EvalResult:
    if entry.source == "mteb":
        source_name, source_url = "MTEB", entry.source_url or MTEB_SOURCE_URL
    else:
        source_url = entry.source_url or (f"{HUB_URL}/{repo_id}" if repo_id else None)
        source_name = "embedtrain" if source_url else None
    return EvalResult(
        task_type=HUB_TASK_TYPES.get(entry.task_type, "other"),
        task_name=entry.task_type,
        dataset_type=entry.dataset_id,
        dataset_name=entry.dataset_name or entry.task_name,
        dataset_config=entry.dataset_config,
        dataset_split=entry.split,
        dataset_revision=entry.dataset_revision,
        metric_type=entry.metric_name,
        metric_name=entry.metric_name,
        metric_value=entry.value,
        source_name=source_name,
        source_url=source_url,
    )


def _is_hub_id(name: Optional[str]) -> bool:
    """True for a plausible Hub model id that is not a local folder on this machine."""
    if not name or os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _body_vars(data: ModelCardData) -> dict[str, Any]:
    query_document = {k: v for k, v in data.prompts.items() if k in ("query", "document") and v}
    others = [k for k, v in data.prompts.items() if k not in ("query", "document") and v]
    return {
        "model_name": data.model_name,
        "summary": data.summary or _default_summary(data),
        "details_table": _table(["Property", "Value"], _details_rows(data)),
        "model_id": data.repo_id or "path/to/model",
        "custom_modules": data.custom_modules,
        "shape_comment": f"(1, {data.embedding_dim})" if data.embedding_dim else "(1, embedding dimension)",
        "prompts": query_document,
        "other_prompt_names": ", ".join(_code(k) for k in others),
        "eval_note": _eval_note(data.eval_results),
        "eval_table": _eval_table(data.eval_results),
        "instructions_table": _table(["Task", "Instruction"],
                                     [[_code(t), _cell(i)] for t, i in data.instructions.items()])
        if data.instructions else "",
        "instructions_count": len(data.instructions),
        "data_lines": [f"[{d}]({HUB_URL}/datasets/{d})" for d in data.datasets]
        + [f"{_code(name)} (local file)" for name in data.local_datasets],
        "losses": [_loss_vars(loss) for loss in data.losses],
        "hyperparameters_table": _table(
            ["Hyperparameter", "Value"], [[_code(k), _code(_plain(v))] for k, v in data.hyperparameters.items()]
        ),
        "run_lines": _run_lines(data),
        "recipe_block": _recipe_block(data.recipe),
        "citations": _citations(data),
    }


def _recipe_block(recipe: Optional[dict]) -> str:
    return _codeblock(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True), "yaml") if recipe else ""


def _default_summary(data: ModelCardData) -> str:
    base = f" fine-tuned from {_model_link(data.base_model)}" if data.base_model else ""
    dim = f"a {data.embedding_dim}-dimensional" if data.embedding_dim else "a dense"
    return (
        f"A [sentence-transformers](https://www.sbert.net) text embedding model{base}, trained with embedtrain. "
        f"It maps sentences and paragraphs to {dim} vector space for semantic search, retrieval and similarity."
    )


def _details_rows(data: ModelCardData) -> list[list[str]]:
    rows = [
        ("Base model", _model_link(data.base_model) if data.base_model else None),
        ("Embedding dimension", data.embedding_dim),
        ("Max tokens", data.max_length),
        ("Pooling", _code(data.pooling) if data.pooling else None),
        ("Normalised", None if data.normalize is None else ("yes (unit length)" if data.normalize else "no")),
        ("Similarity", data.similarity),
        ("Trained prefixes (`truncate_dim`)", ", ".join(map(str, data.compact["dims"])) if data.compact else None),
        ("Trained precisions (`quantize_embeddings`)",
         ", ".join(_code(p) for p in data.compact["sentence_transformers_precision"].values()) if data.compact else None),
        ("Centre", "the mean training embedding is subtracted (a `Dense` layer before the last `Normalize`); "
                   "quantize the model's output as it is" if data.compact and data.compact.get("center") else None),
        ("Basis", "the centred embedding is rotated onto the training embeddings' principal axes (the same `Dense` "
                  "layer), so that each prefix holds the most variance of its size"
         if data.compact and data.compact.get("basis") == "pca" else None),
        ("Binary codes", "the signs of the unit-length prefix times its rotation R, one per prefix in "
                         "`binary_rotations.safetensors` (key: the prefix length): "
                         "`quantize_embeddings(prefix @ R, \"ubinary\")`"
         if data.compact and data.compact.get("binary_rotation", "none") != "none" else None),
        ("LoRA", f"r {data.lora['r']}, alpha {data.lora['alpha']:g} on {', '.join(_code(t) for t in data.lora['target_modules'])}: "
                 f"merged into the weights; the adapter alone is in `{data.lora['folder']}/` (peft)"
         if data.lora else None),
        ("Language", ", ".join(data.language) or None),
        ("License", data.license),
    ]
    return [[label, str(value)] for label, value in rows if value is not None]


def _model_link(name: str) -> str:
    return f"[{name}]({HUB_URL}/{name})" if _is_hub_id(name) else _code(name)


def _eval_note(entries: list[EvalEntry]) -> str:
    note = "Scores are on a 0-1 scale; **bold** marks each task's main metric."
    if any(e.baseline is not None for e in entries):
        note += " *Base model* is the score before training."
    return note


def _eval_table(entries: list[EvalEntry]) -> str:
    with_baseline = any(e.baseline is not None for e in entries)
    headers = ["Task", "Type", "Dataset", "Split", "Metric"] + (["Base model"] if with_baseline else []) + ["Score"]
    rows = []
    for e in entries:
        bold = "**" if e.main_score else ""
        row = [e.task_name, e.task_type, _code(e.dataset_id), e.split, f"{bold}{e.metric_name}{bold}"]
        if with_baseline:
            row.append("" if e.baseline is None else f"{e.baseline:.4f}")
        row.append(f"{bold}{e.value:.4f}{bold}")
        rows.append(row)
    return _table(headers, rows)


def _loss_vars(loss: dict) -> dict[str, str]:
    name = str(loss["name"])
    return {
        "name": name,
        "description": str(loss.get("description") or ""),
        "equation": str(loss.get("equation") or ""),
        "citation": loss.get("citation") or LOSS_CITATIONS.get(name.lower(), ""),
    }


def _run_lines(data: ModelCardData) -> list[str]:
    lines = []
    if data.hardware:
        lines.append(f"Hardware: {data.hardware}")
    if data.training_time_s is not None:
        lines.append(f"Training time: {_duration(data.training_time_s)}")
    return lines


def _citations(data: ModelCardData) -> list[tuple[str, str]]:
    """(title, BibTeX) pairs: Sentence-BERT, each loss's paper, then the extra ones; no BibTeX twice."""
    entries = [("Sentence Transformers", SENTENCE_BERT_CITATION)]
    entries += [(loss["name"], loss["citation"]) for loss in map(_loss_vars, data.losses) if loss["citation"]]
    entries += list(data.citations.items())
    seen: set[str] = set()
    unique = []
    for title, bibtex in entries:
        key = bibtex.strip()
        if key not in seen:
            seen.add(key)
            unique.append((title, key))
    return unique


# --------------------------------------------------------------------------------------
# Markdown helpers
# --------------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table, or '' without rows."""
    if not rows:
        return ""
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text made safe for one table cell: pipes escaped, newlines folded."""
    return " ".join(str(text).splitlines()).replace("|", "\\|")


def _code(text: Any) -> str:
    """Inline code that survives backticks inside ``text``."""
    text = str(text)
    ticks = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _codeblock(text: str, lang: str = "") -> str:
    """A fenced code block whose fence is longer than any backtick run in ``text``."""
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _plain(value: Any) -> str:
    """A hyperparameter value as YAML-like text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def _duration(seconds: float) -> str:
    """'42.0 s', '3 min 05 s', '2 h 03 min 05 s'."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {secs:02d} s" if hours else f"{minutes} min {secs:02d} s"


@lru_cache(maxsize=1)
def _template():
    import jinja2

    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["code"] = _code
    env.filters["codeblock"] = _codeblock
    env.filters["pystr"] = lambda s: json.dumps(str(s))
    source = (Path(__file__).parent / "model_card_template.md").read_text(encoding="utf-8")
    return env.from_string(source)
