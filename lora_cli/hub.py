"""`--push-to-hub`: upload a finished run's adapter or a merged model to a Hugging Face repository."""

from __future__ import annotations

from pathlib import Path

from lora_cli.errors import LoraError

# What of a run folder goes to the hub: the adapter, its tokenizer, the manifest and the picture;
# never the checkpoints (optimizer states) or the raw training log.
RUN_PATTERNS = ["adapter_*", "tokenizer*", "chat_template.jinja", "special_tokens_map.json", "lora_run.json",
                "loss_curve.png", "README.md"]


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
