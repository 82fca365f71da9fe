"""The image side of a vision-language checkpoint as llama.cpp's multimodal library (mtmd) loads it: the
`mmproj` GGUF (architecture `clip`) beside the text GGUF. One record per projector, as llama.cpp's
converter keeps one class per vision model: which stored tensors are the image side, the names they take
(gguf-py's MMPROJ tensor map), how they change, the GGML type each is held in, and the `clip.*` keys.
The base record is here, the projectors in projectors.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import InputError


@dataclass(frozen=True)
class VisionParams:
    """What an mmproj file needs from the checkpoint: its config as transformers parses it (`config`), the
    vision config with llama.cpp's names filled in (`vision`), and the image processor's settings."""

    config: dict
    vision: dict
    preprocessor: dict
    n_blocks: int
    n_embd_text: int
    tokenizer_dir: Path | None = None  # where a projector that reads token ids finds them
    token_ids: dict | None = None  # such ids (Pixtral's [IMG_BREAK])


def find(obj: dict, keys: tuple[str, ...], what: str) -> object:
    """The first of `keys` the vision config sets (as the converter's find_vparam), or InputError."""
    for k in keys:
        if obj.get(k) is not None:
            return obj[k]
    raise InputError(f"config.json: the vision config has no {what} (looked for {', '.join(keys)}).")


def special_token_id(tokenizer_dir: Path, token: str) -> int | None:
    """A special token's id as llama.cpp's converter finds it: tokenizer_config.json's added_tokens_decoder,
    then tokenizer.json's added_tokens."""
    found = None
    for name, key in (("tokenizer_config.json", "added_tokens_decoder"), ("tokenizer.json", "added_tokens")):
        path = tokenizer_dir / name
        if found is None and path.is_file():
            try:
                entries = json.loads(path.read_text(encoding="utf-8")).get(key) or {}
            except (OSError, ValueError) as e:
                raise InputError(f"{path}: not readable JSON ({e}); fix or remove it.") from e
            pairs = entries.items() if isinstance(entries, dict) else ((e.get("id"), e) for e in entries)
            found = next((int(i) for i, e in pairs if (e or {}).get("content") == token), None)
    return found


def read_preprocessor(base_dir: Path) -> dict:
    """preprocessor_config.json and processor_config.json (its image_processor lifted), as the converter
    merges them; InputError when neither gives the image mean and standard deviation."""
    merged: dict = {}
    for name, inner in (
        ("preprocessor_config.json", "media_proc_cfg"),
        ("processor_config.json", "image_processor"),
    ):
        path = base_dir / name
        if path.is_file():
            try:
                cfg = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise InputError(f"{path}: not readable JSON ({e}); fix or remove it.") from e
            merged |= {**cfg, **(cfg.get(inner) or {})}
    if not (merged.get("image_mean") and merged.get("image_std")):
        raise InputError(
            f"{base_dir}: no image_mean / image_std in preprocessor_config.json or processor_config.json; the "
            "vision projector needs the image processor's normalisation. Copy the processor files of the base "
            "model's release into the base folder."
        )
    return merged


class Projector:
    """A vision tower and projector as llama.cpp's mtmd runs them (clip.projector_type)."""

    hf_classes: tuple[str, ...] = ()
    projector_type = ""  # a gguf.VisionProjectorType value
    prefixes: tuple[str, ...] = ()  # stored names (after name()) that belong to the image side

    def name(self, hf_name: str) -> str | None:
        """The stored tensor's name as the converter reads it (one layout for every checkpoint), or None for
        a tensor of the language model."""
        return hf_name if hf_name.startswith(self.prefixes) else None

    def check(self, config: dict) -> None:
        """Refuse, before anything is read, a checkpoint whose projector llama.cpp would not run as this
        record writes it."""

    def read(self, config: dict, preprocessor: dict, tokenizer_dir: Path | None = None) -> VisionParams:
        vision = dict(config.get("vision_config") or {})
        if not vision:
            raise InputError("config.json has no vision_config: this checkpoint has no vision tower.")
        text = {**config, **(config.get("text_config") or {})}
        vision = self.rename(vision)
        n_blocks = int(find(vision, ("num_hidden_layers", "depth", "layers"), "number of layers"))
        return VisionParams(config, vision, preprocessor, n_blocks, int(text["hidden_size"]), tokenizer_dir)

    def rename(self, vision: dict) -> dict:
        """The vision config with the keys llama.cpp's converter reads under its own names."""
        return vision

    def split(
        self, name: str, shape: tuple[int, ...], vp: VisionParams
    ) -> list[tuple[str, tuple[int, ...]]] | None:
        """The tensors a stored tensor becomes, renamed or cut (names before mapping, or GGUF names), or
        None: it stays one, under its own name."""
        return None

    def cut(self, name: str, t: torch.Tensor) -> list[torch.Tensor]:
        """The values of split()'s tensors, in its order."""
        return [t]

    def transform(self, name: str, t: torch.Tensor, vp: VisionParams) -> torch.Tensor:
        return t

    def forced_type(self, name: str, gguf_name: str, gguf_type: str):
        """The GGML type the converter forces on this tensor whatever the file's type, or None."""
        import gguf

        T = gguf.GGMLQuantizationType
        if ".patch_embd.weight" in gguf_name or ".patch_merger.weight" in gguf_name:
            return T.F16 if gguf_type == "f16" else T.F32
        return None

    def add_metadata(self, w, vp: VisionParams) -> None:
        """The clip.* keys every projector has, in the converter's order; subclasses add their own."""
        v = vp.vision
        w.add_clip_has_vision_encoder(True)
        w.add_vision_projection_dim(vp.n_embd_text)
        w.add_vision_image_size(int(find(v, ("image_size",), "image size")))
        w.add_vision_patch_size(int(find(v, ("patch_size",), "patch size")))
        w.add_vision_embedding_length(int(find(v, ("hidden_size", "width"), "hidden size")))
        w.add_vision_feed_forward_length(int(find(v, ("intermediate_size",), "feed-forward size")))
        w.add_vision_block_count(vp.n_blocks)
        w.add_vision_head_count(int(find(v, ("num_attention_heads", "num_heads", "heads"), "head count")))
        w.add_vision_image_mean([float(x) for x in vp.preprocessor["image_mean"]])
        w.add_vision_image_std([float(x) for x in vp.preprocessor["image_std"]])
        w.add_clip_projector_type(self.projector_type)
