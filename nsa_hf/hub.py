"""Hub export: a checkpoint folder whose modeling code loads with ``trust_remote_code=True`` where
nsa-hf is not installed, plus a model card; and the upload of that folder.

The NSA models' ``save_pretrained`` (and so ``push_to_hub``) already writes such a folder: it copies the
modeling files, writes ``auto_map`` and bundles the pure-PyTorch NSA reference with
:func:`bundle_remote_code` (see :mod:`nsa_hf.remote_code`). :func:`export_for_hub` adds the tokenizer
and a model card.
"""
from __future__ import annotations

import os
from pathlib import Path

from .remote_code import BUNDLED_KERNEL_MODULES, bundle_remote_code, has_remote_code

__all__ = ["BUNDLED_KERNEL_MODULES", "bundle_remote_code", "export_for_hub", "push_folder_to_hub"]


def export_for_hub(model, folder: str | os.PathLike, tokenizer=None, card=None, **save_kwargs) -> Path:
    """Write ``model`` (safetensors, config with ``auto_map``, self-contained modeling code),
    ``tokenizer`` and a model card (a ``huggingface_hub.ModelCard``, or a string) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, **save_kwargs)
    if not has_remote_code(folder):
        raise ValueError(
            f"{type(model).__name__} was saved without auto_map: its classes were not registered for auto classes "
            "(import nsa_hf registers NSA-Llama), or save_kwargs has remote_code=False"
        )
    bundle_remote_code(folder)  # what the NSA models' save_pretrained did already; other models need it here
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if card is not None:
        (folder / "README.md").write_text(card if isinstance(card, str) else str(card))
    return folder


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False,
                       commit_message: str = "Upload NSA model") -> str:
    """Upload an exported folder (needs network and a token with write access). Returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    return getattr(info, "commit_url", str(info))
