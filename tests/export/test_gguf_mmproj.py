"""The vision projector (llama.cpp's mmproj GGUF) of vision-language models: the same file llama.cpp's own
converter writes from the same merged folder (tensors byte for byte, clip.* keys), image embeddings from
llama.cpp's mtmd against transformers' on the merged model, the fine-tune's vision-tower change carried
into the file, and the option's refusals (before any work, nothing written)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qmerge.api import export
from qmerge.errors import QmergeError, UnsupportedError
from tests.export.models import PROJECTORS

pytest.importorskip("llama_cpp")
HERE = Path(__file__).resolve().parent
TYPES = ("f32", "q8_0", "f16")
IMAGE = np.random.default_rng(0).integers(0, 256, size=(28, 28, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def converted_projectors(llama_cpp_source, projector_models, tmp_path_factory):
    """{name: folder} with qmerge-mmproj-TYPE.gguf and llama.cpp-mmproj-TYPE.gguf of one merged bf16 model,
    and the converter's failures."""
    root = tmp_path_factory.mktemp("mmproj")
    jobs = []
    for name, (base, adapter) in projector_models.items():
        folder = root / name
        folder.mkdir()
        export(adapter, "bf16", folder / "merged", base=base)
        for t in TYPES:
            out = folder / f"qmerge-{t}.gguf"
            export(folder / "merged", "gguf", out, gguf_type=t, mmproj=folder / f"qmerge-mmproj-{t}.gguf")
            jobs += [str(folder / "merged"), f"{t}:mmproj", str(folder / f"llama.cpp-mmproj-{t}.gguf")]
    done = subprocess.run(
        [
            sys.executable,
            str(HERE / "run_converter.py"),
            str(llama_cpp_source / "convert_hf_to_gguf.py"),
            *jobs,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return root, done.stdout + done.stderr[-3000:]


def _keys(reader) -> dict:
    keep = ("general.architecture", "general.type", "general.file_type")
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("clip.") or k in keep}


@pytest.mark.parametrize("name", sorted(PROJECTORS))
@pytest.mark.parametrize("gtype", TYPES)
def test_same_projector_as_llama_cpps_converter(converted_projectors, name, gtype):
    import gguf

    root, log = converted_projectors
    theirs_path = root / name / f"llama.cpp-mmproj-{gtype}.gguf"
    assert theirs_path.exists(), log
    ours = gguf.GGUFReader(str(root / name / f"qmerge-mmproj-{gtype}.gguf"))
    theirs = gguf.GGUFReader(str(theirs_path))
    ta, tb = {t.name: t for t in ours.tensors}, {t.name: t for t in theirs.tensors}
    if name == "mistral3_vlm":  # the row llama.cpp needs and its converter does not find in these checkpoints
        assert np.array_equal(ta.pop("v.token_embd.img_break").data, _img_break_row(root / name / "merged"))
    assert sorted(ta) == sorted(tb)
    for n in ta:
        assert (ta[n].tensor_type, list(ta[n].shape)) == (tb[n].tensor_type, list(tb[n].shape)), n
        assert np.array_equal(ta[n].data, tb[n].data), n
    assert _keys(ours) == _keys(theirs)


def _img_break_row(merged: Path) -> np.ndarray:
    """The [IMG_BREAK] token's row of the merged embedding, as float32."""
    from safetensors.torch import load_file

    from qmerge.io.gguf.mmproj import special_token_id

    tensors = load_file(merged / "model.safetensors")
    (embedding,) = [
        t for n, t in tensors.items() if "language_model" in n and n.endswith("embed_tokens.weight")
    ]
    return embedding[special_token_id(merged, "[IMG_BREAK]")].float().numpy()


def _transformers_image_features(folder: Path, preprocessor: dict) -> np.ndarray:
    """Gemma 3's image features by transformers (the image normalised as its processor does; 28 pixels is
    the tiny model's image size, so neither side resizes)."""
    from transformers import AutoModelForImageTextToText

    x = torch.tensor(IMAGE, dtype=torch.float32).permute(2, 0, 1)[None] / 255
    mean, std = (torch.tensor(preprocessor[k])[:, None, None] for k in ("image_mean", "image_std"))
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    pixels = (x - mean) / std
    if model.config.model_type == "idefics3":  # [batch, images, channels, height, width]
        pixels = pixels[None]
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixels)
    out = getattr(out, "pooler_output", out)
    out = torch.cat(list(out)) if isinstance(out, (list, tuple)) else out
    return out.reshape(-1, out.shape[-1]).numpy()


def _peft_image_features(adapter: Path, base: Path, preprocessor: dict) -> np.ndarray:
    """Gemma 3's image features by PEFT's unmerged model over the base as bitsandbytes quantizes it to NF4
    (the vision tower's linears too) and dequantizes it: what training computed."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from tests.helpers import bnb_config

    model = AutoModelForImageTextToText.from_pretrained(
        base, device_map="cpu", quantization_config=bnb_config()
    )
    model = PeftModel.from_pretrained(model.dequantize().float(), str(adapter)).eval()
    x = torch.tensor(IMAGE, dtype=torch.float32).permute(2, 0, 1)[None] / 255
    mean, std = (torch.tensor(preprocessor[k])[:, None, None] for k in ("image_mean", "image_std"))
    with torch.no_grad():
        out = model.base_model.model.model.get_image_features(pixel_values=(x - mean) / std)
    out = getattr(out, "pooler_output", out)
    return out.reshape(-1, out.shape[-1]).numpy()


def test_vision_tower_merge_matches_peft(tmp_path, projector_models):
    """LoRA on the vision tower of a Gemma 3 base in its released layout (`vision_tower.vision_model.*`):
    the merge's image features equal PEFT's unmerged model over the NF4 base (measured 3.3e-6 on features
    up to 8.7)."""
    base, adapter = projector_models["gemma3_vlm"]
    export(adapter, "fp32", tmp_path / "merged", base=base)
    want = _peft_image_features(adapter, base, PROJECTORS["gemma3_vlm"])
    got = _transformers_image_features(tmp_path / "merged", PROJECTORS["gemma3_vlm"])
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()


def test_gemma3_image_embeddings_match_transformers(tmp_path, projector_models):
    """llama.cpp's image embeddings from the GGUF and projector written straight from the adapter, against
    transformers on the fp32 merge; the vision tower's LoRA moves them far more than the two differ.
    Measured: 5.4e-3 apart (llama.cpp's GELU is a table lookup) on features up to 8.7; the base's 1.38 away."""
    from tests.export.mtmd import image_embeddings

    base, adapter = projector_models["gemma3_vlm"]
    report = export(
        adapter, "gguf", tmp_path / "m.gguf", base=base, gguf_type="f32", mmproj=tmp_path / "p.gguf"
    )
    projector = report.details["mmproj"]
    assert projector["projector_type"] == "gemma3" and projector["tensors_merged"] > 0
    assert not [w for w in report.warnings if "mmproj" in w]  # the projector is written: nothing to say
    assert [f.path for f in report.files][-1] == str(tmp_path / "p.gguf")
    got = image_embeddings(tmp_path / "m.gguf", tmp_path / "p.gguf", IMAGE)
    export(adapter, "fp32", tmp_path / "merged", base=base)
    want = _transformers_image_features(tmp_path / "merged", PROJECTORS["gemma3_vlm"])
    unchanged = _transformers_image_features(base, PROJECTORS["gemma3_vlm"])
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 2e-3 * np.abs(want).max()
    assert np.abs(unchanged - want).max() > 10 * np.abs(got - want).max()


def test_smolvlm_image_embeddings_match_transformers(tmp_path, projector_models):
    """SmolVLM (Idefics3): llama.cpp's image embeddings from the GGUF and projector written straight from the
    adapter (LoRA on the vision tower too) against transformers on the fp32 merge. Measured: 1.5e-4 apart on
    features up to 0.88; the base's 0.08 away."""
    from tests.export.mtmd import image_embeddings

    base, adapter = projector_models["idefics3"]
    report = export(
        adapter, "gguf", tmp_path / "m.gguf", base=base, gguf_type="f32", mmproj=tmp_path / "p.gguf"
    )
    assert report.details["gguf_architecture"] == "llama"
    assert report.details["mmproj"]["projector_type"] == "idefics3"
    assert report.details["mmproj"]["tensors_merged"] > 0
    got = image_embeddings(tmp_path / "m.gguf", tmp_path / "p.gguf", IMAGE)
    export(adapter, "fp32", tmp_path / "merged", base=base)
    want = _transformers_image_features(tmp_path / "merged", PROJECTORS["idefics3"])
    unchanged = _transformers_image_features(base, PROJECTORS["idefics3"])
    assert got.shape == want.shape == (1, 64)
    assert np.abs(got - want).max() < 2e-3 * np.abs(want).max()
    assert np.abs(unchanged - want).max() > 10 * np.abs(got - want).max()


def test_force_replaces_a_projector_qmerge_wrote_only(tmp_path, projector_models):
    """--force replaces the projector file qmerge wrote (it carries qmerge's key), never a user's file."""
    base, adapter = projector_models["qwen2_vl"]
    out, mmproj = tmp_path / "m.gguf", tmp_path / "p.gguf"
    export(adapter, "gguf", out, base=base, gguf_type="f16", mmproj=mmproj)
    export(adapter, "gguf", out, base=base, gguf_type="f16", mmproj=mmproj, force=True)
    (tmp_path / "mine.gguf").write_bytes(b"GGUF user data")
    with pytest.raises(QmergeError, match="replaces only outputs qmerge wrote"):
        export(adapter, "gguf", tmp_path / "n.gguf", base=base, mmproj=tmp_path / "mine.gguf", force=True)
    assert (tmp_path / "mine.gguf").read_bytes() == b"GGUF user data" and not (tmp_path / "n.gguf").exists()


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "mistral3_vlm", "idefics3"])
def test_projectors_encode_images_in_llama_cpp(tmp_path, projector_models, name):
    """Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Pixtral (Mistral 3) and SmolVLM (Idefics3): llama.cpp's mtmd loads the projector and
    encodes an image (the values are the converter test's: byte-identical to llama.cpp's own conversion;
    Pixtral's with the [IMG_BREAK] row mtmd requires). Llama 4's vision graph in llama.cpp 0.3.36 aborts at
    warm-up on the tiny model's shape: its projector is checked by the converter test alone."""
    from tests.export.mtmd import image_embeddings

    base, adapter = projector_models[name]
    report = export(
        adapter, "gguf", tmp_path / "m.gguf", base=base, gguf_type="q4_k_m", mmproj=tmp_path / "p.gguf"
    )
    assert report.details["mmproj"]["gguf_type"] == "f16"  # llama.cpp's quantizer does not take projectors
    got = image_embeddings(tmp_path / "m.gguf", tmp_path / "p.gguf", np.tile(IMAGE, (2, 2, 1)))
    if name == "mistral3_vlm":
        got = _without_break_rows(got, tmp_path / "p.gguf")
    assert got.shape[0] > 0 and got.shape[1] == 64 and np.isfinite(got).all() and np.abs(got).max() > 0


def _without_break_rows(got: np.ndarray, mmproj: Path) -> np.ndarray:
    """Pixtral's image rows, the [IMG_BREAK] row after each row of patches checked and taken out. llama.cpp
    0.3.36 builds those rows as `0 * (a new, unset tensor) + img_break`: the stored row where the memory it
    reuses holds finite numbers, NaN where it holds NaN or inf (seen in one CI run). qmerge's file is not at
    fault, so a break row passes when every finite value is the stored row's."""
    import gguf

    (row,) = [t.data for t in gguf.GGUFReader(str(mmproj)).tensors if t.name == "v.token_embd.img_break"]
    side = round(
        (-1 + (5 + 4 * len(got)) ** 0.5) / 2
    )  # a square image: side * side patches + side - 1 breaks
    assert side * side + side - 1 == len(got), got.shape
    breaks = [(k + 1) * (side + 1) - 1 for k in range(side - 1)]
    for i in breaks:
        assert np.where(np.isfinite(got[i]), got[i] == row, True).all(), i
    return np.delete(got, breaks, axis=0)


def test_projector_refusals_before_any_work(tmp_path, projector_models, vlm_models, arch_adapters):
    """Each refusal comes before anything is written: a text model, a LLaVA over a CLIP tower (llama.cpp's
    converter writes LLaVA projectors over Pixtral only), a model whose projector qmerge does not write
    (with the route), a Pixtral tokenizer without [IMG_BREAK], gguf-lora, a path that is a user's file or
    the GGUF's own path."""
    from qmerge.io.gguf.projectors import projector_of

    base, adapter = arch_adapters["llama"]
    out, mmproj = tmp_path / "m.gguf", tmp_path / "p.gguf"
    with pytest.raises(UnsupportedError, match="no vision tower"):
        export(adapter, "gguf", out, base=base, mmproj=mmproj)
    base, adapter = vlm_models["llava"]
    with pytest.raises(UnsupportedError, match="over a Pixtral tower only"):
        export(adapter, "gguf", out, base=base, mmproj=mmproj)
    mllama = {"architectures": ["MllamaForConditionalGeneration"], "vision_config": {"hidden_size": 64}}
    with pytest.raises(UnsupportedError, match="convert_hf_to_gguf.py MERGED --mmproj"):
        projector_of(mllama, base)
    pixtral = projector_models["mistral3_vlm"][0]
    config = json.loads((pixtral / "config.json").read_text())
    with pytest.raises(QmergeError, match=r"no \[IMG_BREAK\] token"):  # the demo's tokenizer has none
        projector_of(config, pixtral, vlm_models["mistral3_vlm"][0])

    with pytest.raises(UnsupportedError, match="mmproj"):
        export(adapter, "gguf-lora", tmp_path / "lora", base=base, mmproj=mmproj)
    base, adapter = projector_models["qwen2_vl"]
    with pytest.raises(UnsupportedError, match="vision projector would be the output file"):
        export(adapter, "gguf", out, base=base, mmproj=out)
    mmproj.write_text("mine")
    with pytest.raises(QmergeError, match="already exists"):
        export(adapter, "gguf", out, base=base, mmproj=mmproj)
    assert mmproj.read_text() == "mine" and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.gguf"]


def test_projector_from_the_command_line(tmp_path, projector_models):
    from click.testing import CliRunner

    from qmerge.cli import cli

    base, adapter = projector_models["qwen2_5_vl"]
    args = ["export", str(adapter), "--base", str(base), "--to", "gguf", "--gguf-type", "q8_0"]
    args += ["-o", str(tmp_path / "m.gguf"), "--mmproj", str(tmp_path / "p.gguf"), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (
        report["mmproj"]["projector_type"] == "qwen2.5vl_merger" and report["mmproj"]["gguf_type"] == "q8_0"
    )
    assert [f["path"] for f in report["files"]] == ["m.gguf", str(tmp_path / "p.gguf")]
    wrong = CliRunner().invoke(
        cli, ["export", str(adapter), "--to", "bf16", "-o", str(tmp_path / "x"), "--mmproj", "p"]
    )
    assert wrong.exit_code == 2 and "--mmproj" in wrong.output
