"""Bases named by Hugging Face Hub id (`org/name`, `org/name@revision`), as nearly every
adapter_config.json names them: found in the local Hugging Face cache the way transformers finds them
(huggingface_hub's snapshot_download with local_files_only; HF_HUB_CACHE / HF_HOME honoured). qmerge
downloads nothing: a base that is not in the cache is one message saying how to get it."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import InputError

# A Hub repository id: an owner and a name of letters, digits, '-', '_' and '.', optionally @revision.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


def local_directory(named: str, beside: Path) -> Path | None:
    """The directory a base_model_name_or_path names on this machine: as given, else relative to `beside`
    (the adapter's directory: TRL writes the path as given at training time); None when it names none."""
    return next((p for p in (Path(named), Path(beside) / named) if p.is_dir()), None)


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """("org/name", revision or None) for a Hub id, None for anything else (a path, say)."""
    m = _HUB_ID.fullmatch(str(text))
    if m is None or m["repo"].startswith((".", "/")) or ".." in m["repo"]:
        return None
    return m["repo"], m["revision"]


def cached_snapshot(repo_id: str, revision: str | None = None, named_by: str = "base ") -> Path:
    """The directory of `repo_id` at `revision` (default: the cache's main) in the local Hugging Face cache,
    or an InputError that names the id, the revision and the cache, and what to do."""
    from huggingface_hub import constants, snapshot_download

    cache = Path(constants.HF_HUB_CACHE)
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - LocalEntryNotFoundError, a revision the cache lacks, ...
        at = f" at revision {revision}" if revision else ""
        raise InputError(
            f"{named_by}{repo_id!r}{at} is not in the Hugging Face cache ({cache}): {type(e).__name__}. "
            f"qmerge downloads nothing: run `hf download {repo_id}"
            + (f" --revision {revision}" if revision else "")
            + "` (or load it once with transformers), or pass the base directory with --base."
        ) from e
