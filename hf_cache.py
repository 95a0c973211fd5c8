"""
Hugging Face repo ids on this machine: found in the local HF cache, never downloaded.

model.resolve_checkpoint turns a repo id such as meta-llama/Llama-2-7b-hf into the folder of its
snapshot in the cache (HF_HUB_CACHE, or HF_HOME/hub). A repo that is not there is an error that
prints hf_download_command, the one command that fetches what loading needs.
"""

from __future__ import annotations

import re
from pathlib import Path

# An HF repo id: owner/name (one slash; letters, digits, '-', '_', '.').
HF_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hf_download_command(repo_id: str) -> str:
    """The command that puts what loading needs (configs, safetensors weights, the tokenizer and
    its chat template) into the HF cache, where resolve_checkpoint finds it; not the .bin/.pth
    copies some repositories also hold."""
    return (f'hf download {repo_id} --include "*.json" --include "*.safetensors" '
            f'--include "*.jinja"')


def hf_cache_dir() -> str:
    """Where huggingface_hub keeps its cache: HF_HUB_CACHE, HF_HOME/hub, or its default."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return "~/.cache/huggingface/hub"
    return constants.HF_HUB_CACHE


def hf_cache_snapshot(repo_id: str) -> Path | None:
    """The folder of `repo_id` in the local Hugging Face cache (HF_HUB_CACHE, or HF_HOME/hub),
    or None when it is not there. Never downloads: local_files_only."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None
