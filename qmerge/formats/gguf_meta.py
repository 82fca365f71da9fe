"""A GGUF's general.* metadata as llama.cpp's converter writes it, by gguf-py's own Metadata (the heuristics
convert_hf_to_gguf.py applies to a model's card, config and name): name, basename, size label, finetune,
license, tags, datasets and the base model (name, organization, repository), from the model card qmerge
writes for a merge (io/card.py: the base's Hub id, the cards' license and tags); and the file name
llama.cpp's naming convention gives it (`-o DIR`)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..io.card import card_data, hub_id_of
from ..pipeline.source import Source

_CHECKPOINT = re.compile(r"checkpoint-\d+$")


def finetune_label(source: Source) -> str | None:
    """The fine-tune's name: the adapter's directory, or the run's directory above a trainer's checkpoint-N
    (an adapter at runs/support-bot/checkpoint-40 is "support-bot"); None without an adapter."""
    if source.adapter is None:
        return None
    path = source.adapter.path.resolve()
    name = path.parent.name if _CHECKPOINT.match(path.name) and path.parent.name else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or None


def gguf_metadata(source: Source, gguf_type: str, name: str | None = None):
    """gguf.Metadata for the GGUF of `source` (general.name is `name` when given)."""
    import gguf

    card = card_data(source, {"export": "gguf", "dtype": gguf_type})
    adapter = source.adapter
    named, beside = (adapter.base_model_name_or_path, adapter.path) if adapter is not None else (None, None)
    base_id = hub_id_of(source.base.path, named, beside) or source.base.path.name
    total = sum(torch.Size(s.shape).numel() for s in source.tensors.values())
    # the base's name gives the basename, size label and version, as a model folder's name gives them to
    # the converter; the card gives the base model, license and tags
    meta = gguf.Metadata.apply_metadata_heuristic(
        gguf.Metadata(), card, None, Path(base_id.split("/")[-1]), total
    )
    finetune = finetune_label(source)
    if finetune:
        meta.finetune = finetune
    if meta.basename is None:  # the heuristic found none in the base's name: the name itself
        meta.basename = base_id.split("/")[-1]
    if meta.size_label is None:
        meta.size_label = gguf.size_label(total, 0, 0, 0)
    if name:
        meta.name = name
    elif finetune:
        meta.name = f"{gguf.Metadata.id_to_title(base_id.split('/')[-1])} {finetune}"
    meta.name = meta.name or gguf.Metadata.id_to_title(base_id.split("/")[-1]) or "model"
    return meta


def gguf_file_name(meta, gguf_type: str) -> str:
    """<basename>-<size label>-<finetune>-<version>-<type>.gguf, llama.cpp's naming convention."""
    import gguf

    stem = gguf.naming_convention(
        meta.name, meta.basename, meta.finetune, meta.version, meta.size_label, gguf_type.upper()
    )
    return f"{stem}.gguf"
