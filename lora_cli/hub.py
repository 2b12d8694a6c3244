"""The Hugging Face hub: one quick question before a download, and `--push-to-hub` (upload a finished run's
adapter or a merged model to a repository)."""

from __future__ import annotations

from pathlib import Path

from lora_cli.errors import LoraError

# What of a run folder goes to the hub: the adapter, its tokenizer, the manifest and the picture;
# never the checkpoints (optimizer states) or the raw training log.
RUN_PATTERNS = ["adapter_*", "tokenizer*", "chat_template.jinja", "special_tokens_map.json", "lora_run.json",
                "loss_curve.png", "README.md"]


# What `ask` answers besides None (the repository is there) and the name of a network error.
GATED, NOT_FOUND = "gated", "not found"


def is_repo_id(name: str) -> bool:
    """Whether `name` can be a hub repository id (NAME or ORG/NAME, the characters the hub allows)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def ask(repo_id: str, repo_type: str, revision: str | None = None) -> str | None:
    """One question to the hub, 15 s at most, where transformers and datasets would retry for half a minute.

    Returns None when the repository (model or dataset) is there, else why not: GATED, NOT_FOUND (unknown id
    or revision, or private), or the type of the network error; the callers word it for what was asked.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=15)
    except GatedRepoError:
        return GATED
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return NOT_FOUND
    except Exception as exc:  # network errors come from several HTTP libraries
        return type(exc).__name__
    return None


def check_push_target(repo_id: str | None) -> None:
    """Fail before any training when an upload is asked for but cannot happen."""
    import os
    import re

    from lora_cli.errors import ConfigError

    if not repo_id:
        return
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo_id):
        raise ConfigError(f"--push-to-hub {repo_id!r} is not a repository id; use NAME or ORG/NAME")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE=1 forbids uploading; unset it or push later")


def push(folder: Path, repo_id: str, *, run: bool) -> str:
    """Create the repository if needed and upload; returns its URL. The token comes from `hf auth login`."""
    import os

    from huggingface_hub import HfApi

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise LoraError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE=1 forbids uploading; unset it or push later")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, exist_ok=True, private=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                          allow_patterns=RUN_PATTERNS if run else None, ignore_patterns=["checkpoints/*", ".*"])
    except Exception as exc:  # network, authentication and permission errors come in many types
        raise LoraError(f"--push-to-hub {repo_id}: upload failed ({type(exc).__name__}); check your network and "
                        f"`hf auth login`; the files are safe in {folder}") from None
    return str(url)
