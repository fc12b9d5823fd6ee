"""What the training loop needs for NV-Embed recipes: instructions, labelled data, decoders and stages.

- A dataset's ``instruction`` becomes the query prompt ``Instruct: {instruction}\\nQuery: ``.
- A dataset with ``label_column`` is read as (text, label) rows and turned into example-based pairs.
- ``model.bidirectional: true`` loads the decoder as a :class:`~embedtrain.models.decoder.DecoderEncoder`.
- ``model.previous_stage: RECIPE`` chains recipes: this run starts from that recipe's output model, and
  trains it first when it is missing or unfinished (resuming from its checkpoints).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from embedtrain.config import DatasetConfig, EvalTaskConfig, TextRecipe, dataset_name, load_recipe, resolve_path
from embedtrain.data import PairDataset, read_pairs
from embedtrain.data.example_based import read_labeled
from embedtrain.errors import EmbedtrainError
from embedtrain.models.instructions import instruction_prefix

RESULTS_FILE = "results.json"
"""Written last by a finished run (after model/): its presence marks a stage as done."""


def query_prompt_of(cfg: DatasetConfig | EvalTaskConfig) -> str:
    """The text put before each query: the NV-Embed instruction prefix, or the plain query_prompt."""
    instruction = getattr(cfg, "instruction", None)
    return instruction_prefix(instruction) if instruction is not None else cfg.query_prompt


def load_training_dataset(ds: DatasetConfig, index: int, seed: int = 0) -> PairDataset:
    """Read one ``data.train`` entry: (query, positive, negatives) rows, or labelled rows made into pairs."""
    where = f"data.train[{index}]"
    if ds.label_column is not None:
        return read_labeled(
            ds.path, where, dataset_name(ds), ds.text_column, ds.label_column, ds.example_negatives,
            query_prompt_of(ds), ds.document_prompt, ds.weight, ds.split, ds.max_rows, ds.subset, seed=seed,
        )
    return read_pairs(
        ds.path, where, dataset_name(ds), ds.query_column, ds.positive_column, ds.negative_columns,
        query_prompt_of(ds), ds.document_prompt, ds.weight, ds.split, ds.max_rows, ds.subset,
    )


def load_recipe_decoder(recipe: TextRecipe, model_source: str, device):
    """The recipe's decoder encoder, loaded on ``device`` (bidirectional, checked; LoRA and head as set)."""
    from dataclasses import asdict

    from embedtrain.models.decoder import load_decoder_encoder

    m = recipe.model
    return load_decoder_encoder(
        model_source, pooling=m.pooling,
        normalize=m.normalize, max_length=m.max_length, query_max_length=m.query_max_length,
        document_max_length=m.document_max_length, query_prompt=query_prompt_of(recipe.data.train[0]),
        document_prompt=recipe.data.train[0].document_prompt, instruction_masking=m.instruction_masking,
        latent_attention=asdict(m.latent_attention), lora=asdict(m.lora) if m.lora is not None else None,
        dtype=m.dtype, attn_implementation=m.attn_implementation, gradient_checkpointing=m.gradient_checkpointing,
        trust_remote_code=m.trust_remote_code, revision=m.revision, device=device,
    )


def prompt_lengths(encoder, datasets: list[PairDataset]) -> Optional[dict[str, int]]:
    """Tokens each dataset prompt takes (for the collator's pooling masks), or None without instruction masking."""
    if not getattr(encoder, "instruction_masking", False):
        return None
    prompts = {p for d in datasets for p in (d.query_prompt, d.document_prompt) if p}
    return {p: encoder.prompt_token_count(p) for p in prompts}


def stage_output(recipe: TextRecipe) -> Path:
    return Path(recipe.output.dir) / "model"


def previous_stage_model(recipe: TextRecipe, train_fn: Callable, log=print, chain: tuple[str, ...] = ()) -> str:
    """The model folder a ``previous_stage`` recipe produced, training that stage first if needed.

    ``train_fn(recipe, resume)`` runs a stage (the training loop's ``train``). A stage counts as done
    when its output dir holds ``results.json`` (written after the final model); an unfinished one is
    resumed from its newest checkpoint. Chains of any length work; a cycle is an error.
    """
    path = recipe.model.previous_stage
    resolved = str(Path(resolve_path(path)).resolve())
    if resolved in chain:
        raise EmbedtrainError(f"model.previous_stage: {path} is part of a cycle of stages ({' -> '.join(chain + (resolved,))})")
    try:
        previous = load_recipe(resolved)
    except EmbedtrainError as err:
        raise EmbedtrainError(f"model.previous_stage: {path}: {err}") from None
    if not isinstance(previous, TextRecipe):
        raise EmbedtrainError(f"model.previous_stage: {path} is a recipe of kind {previous.kind}; "
                              "a stage before a text recipe must be a text recipe")
    out = Path(previous.output.dir)
    if not (out / RESULTS_FILE).is_file() or not stage_output(previous).is_dir():
        started = out.is_dir() and any(out.iterdir())
        log(f"previous stage {path}: {'resuming' if started else 'training'} it first (output {out})")
        result = train_fn(previous, resume="auto" if started else None, chain=chain + (resolved,))
        if getattr(result, "stopped", False):
            raise EmbedtrainError(f"model.previous_stage: {path} was stopped before it finished; run this recipe again to resume it")
    return str(stage_output(previous))
