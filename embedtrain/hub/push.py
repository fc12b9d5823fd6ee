"""Push a saved model folder of any kind (see :data:`embedtrain.models.MODEL_KINDS`) to the Hugging Face Hub
in one commit.

Failures become one-line :class:`EmbedtrainError` messages that never include the token: it is
not logged, and huggingface_hub's exceptions (whose request objects carry it in the Authorization
header) are neither formatted into messages nor shown as the cause (raised ``from None``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import BadRequestError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled, OIDCError
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id

from embedtrain.errors import EmbedtrainError

logger = logging.getLogger(__name__)

AUTH_FIX = "run `hf auth login` or set HF_TOKEN (a token with write access)"


def push_model(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = True,
    revision: Optional[str] = None,
    token: Optional[str] = None,
    endpoint: Optional[str] = None,
    commit_message: str = "Upload model trained with embedtrain",
) -> str:
    """Upload every file of a saved model folder to ``repo_id`` and return the commit URL.

    Any folder :func:`~embedtrain.models.detect_model_kind` recognises can be pushed (text, MoE and decoder
    encoders, CLIP in open_clip's layout, VLM2Vec, metric learning). A text-encoder folder without a
    ``README.md`` gets a model card generated from its own files (:mod:`embedtrain.hub.folder_card`: no
    results, which the folder does not record); the other kinds are pushed as they are.

    The repo is created if missing (``private`` applies only then), and the branch ``revision`` too
    when given. All files go in a single commit. The token comes from ``token``, else from
    huggingface_hub's usual sources (``HF_TOKEN``, the token stored by ``hf auth login``); the
    endpoint from ``endpoint``, else ``HF_ENDPOINT``, else the public Hub. Nothing is written into
    ``model_dir``.
    """
    from embedtrain.models.folders import detect_model_kind

    folder = Path(model_dir)
    if not folder.is_dir():
        raise EmbedtrainError(f"{folder}: model folder not found; push the folder a run saved, e.g. <output.dir>/model")
    kind = detect_model_kind(folder)
    _check_repo_id(repo_id)
    operations = _folder_operations(folder) + _card_operations(folder, kind, repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    try:
        if token is None and get_token() is None:
            raise EmbedtrainError(f"not authenticated for {repo_id}: {AUTH_FIX}")
        logger.info("pushing %d files from %s to %s at %s", len(operations), folder, repo_id, api.endpoint)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        # Not upload_folder: with hf_xet installed it may split a folder into several commits
        # (after 256 files, 100 MB of small files or 5 minutes); create_commit is always one.
        commit = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    except (httpx2.HTTPError, OfflineModeIsEnabled, OIDCError, ValueError) as err:
        message = _push_error_message(err, folder, repo_id, api.endpoint)
        if message is None:
            raise
        raise EmbedtrainError(message) from None
    return commit.commit_url


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
        valid = repo_id.count("/") == 1
    except HFValidationError:
        valid = False
    if not valid:
        raise EmbedtrainError(f"{repo_id!r} is not a Hub repo id; use user/name (letters, digits, '-', '_', '.')")


def _folder_operations(folder: Path) -> list[CommitOperationAdd]:
    """One add operation per file (sorted), skipping what huggingface_hub never uploads (.git, caches)."""
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    kept = filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS)
    try:
        return [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=files[rel]) for rel in kept]
    except OSError as err:
        what = err.filename or "a file"
        raise EmbedtrainError(f"{folder}: cannot read {what} ({err.strerror}); check its permissions") from None


def _card_operations(folder: Path, kind: str, repo_id: str) -> list[CommitOperationAdd]:
    """A generated README.md for a text-encoder folder that has none (added to the commit, not the folder)."""
    from embedtrain.hub.folder_card import CARD_KINDS, card_for_folder
    from embedtrain.hub.model_card import render_model_card

    if (folder / "README.md").is_file():
        return []
    if kind not in CARD_KINDS:
        logger.info("%s has no README.md; a %s model is pushed without a model card", folder, kind)
        return []
    logger.info("%s has no README.md; pushing a model card generated from its files", folder)
    card = render_model_card(card_for_folder(folder, repo_id))
    return [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8"))]


def _push_error_message(err: Exception, folder: Path, repo_id: str, endpoint: str) -> Optional[str]:
    """The one-line message for a failed push, or None when ``err`` is a bug to re-raise."""
    if isinstance(err, OfflineModeIsEnabled):
        return f"cannot reach the Hub at {endpoint}: offline mode is on; unset HF_HUB_OFFLINE to push"
    if isinstance(err, HfHubHTTPError):
        status = err.response.status_code
        if status in (401, 403):
            return f"not authenticated for {repo_id} (HTTP {status}): {AUTH_FIX}"
        detail = _first_line(err.server_message)
        return (
            f"pushing to {repo_id} at {endpoint} failed: HTTP {status}{': ' + detail if detail else ''}; "
            "try again, or check the repo on the Hub"
        )
    if isinstance(err, httpx2.TransportError):  # refused, DNS, TLS, timeouts, dropped connections
        return f"cannot reach the Hub at {endpoint} ({type(err).__name__}); check the network or HF_ENDPOINT"
    if isinstance(err, OIDCError):
        return f"not authenticated for {repo_id} (OIDC token exchange failed): {AUTH_FIX}"
    if isinstance(err.__cause__, BadRequestError):  # the Hub rejected README.md's metadata
        reason = _first_line(str(err), skip=1)
        return f"{folder / 'README.md'}: the Hub rejected the model card metadata ({reason}); fix the card"
    return None


def _first_line(text: Optional[str], skip: int = 0, limit: int = 200) -> str:
    """Line ``skip`` of the non-empty lines of ``text``, cut to ``limit`` characters ('' if none)."""
    lines = [line.strip(" -") for line in (text or "").splitlines() if line.strip(" -")]
    return lines[skip][:limit] if len(lines) > skip else ""
