"""`check --data` with image+text records on a vision-language fine-tune (a tiny LLaVA whose adapter also
changes the vision tower): the records prepared by the model's processor, the reference equal to PEFT's
unmerged forward over the NF4 base on the same token ids and pixel values, and what images catch that text
cannot."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from qmerge.api import check, export, merge
from qmerge.cli import cli
from qmerge.errors import InputError, UnsupportedError
from tests.verify.image_data import MARKER, image_records, tiny_vlm_with_processor

pytest.importorskip("PIL")


FAMILIES = ["llava", "gemma3"]
CLASSES = {"llava": "LlavaForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration"}
# what the processor gives besides the ids (Gemma 3 marks image tokens, which attend to each other)
EXTRA = {"llava": {"pixel_values"}, "gemma3": {"pixel_values", "token_type_ids"}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> {base, adapter, merged (fp32), text_only (merged without the vision tower's LoRA), data,
    trl}, each family built when a test first asks for it."""
    built = {}

    def get(family: str) -> dict:
        if family not in built:
            built[family] = _build(tmp_path_factory.mktemp(family), family)
        return built[family]

    return get


def _build(root, family: str) -> dict:
    from safetensors.torch import load_file, save_file

    base, adapter = tiny_vlm_with_processor(root, family)
    merge(adapter, root / "merged", base=base, dtype="fp32")
    language_only = root / "adapter_language_only"
    shutil.copytree(adapter, language_only)
    tensors = load_file(adapter / "adapter_model.safetensors")
    kept = {k: v for k, v in tensors.items() if "vision_tower" not in k}
    assert len(kept) < len(tensors)
    save_file(kept, language_only / "adapter_model.safetensors")
    merge(language_only, root / "text_only", base=base, dtype="fp32")
    return dict(
        family=family,
        base=base,
        adapter=adapter,
        merged=root / "merged",
        text_only=root / "text_only",
        data=image_records(root / "data"),
        trl=image_records(root / "trl", trl_column=True),
    )


@pytest.fixture
def llava(models):
    return models("llava")


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_with_images_is_pefts_unmerged_forward(models, family):
    """The streamed reference, fed the processor's token ids and pixel values, gives PEFT's logits over the
    base bitsandbytes quantizes (vision tower included), and the scored positions are the answer's."""
    import transformers
    from transformers import AutoProcessor

    from qmerge.pipeline.source import open_checkpoint
    from qmerge.verify.images import load_processor
    from qmerge.verify.runner import chunks
    from qmerge.verify.streamed import logits, streamed_reference
    from qmerge.verify.tokens import data_batch
    from tests.helpers import reference_unmerged

    m = models(family)
    processor = AutoProcessor.from_pretrained(m["base"])
    batch = data_batch(processor.tokenizer, m["data"], processor=lambda: load_processor(m["base"]))
    assert batch.inputs is not None and len(batch) == 2
    model = streamed_reference(open_checkpoint(m["adapter"], m["base"], None, "dequantized"))
    image_token = json.loads((m["base"] / "config.json").read_text())["image_token_index"]
    cls = getattr(transformers, CLASSES[family])
    for part in chunks(batch, 320):
        assert (part.tokens == image_token).sum() == 4  # the processor put the image's 4 tokens in
        assert set(part.extra) == EXTRA[family]
        got = logits(model, part.tokens, part.extra)
        want = reference_unmerged(m["adapter"], m["base"], part.tokens, model_class=cls, inputs=part.extra)
        assert (got - want).abs().max() < 1e-4
        answer = processor.tokenizer.decode(part.targets[part.scored])
        assert answer.startswith(("a quick brown fox", "red and blue"))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("records", ["data", "trl"])
def test_check_on_image_records(models, family, records):
    """The exact merge passes on image records (an image part's path, or TRL's images column); a merge that
    lost the vision tower's LoRA is far off on them, while on text the two are the same."""
    m = models(family)
    exact = check(m["adapter"], m["merged"], base=m["base"], data=m[records])
    assert exact.passed and exact.metrics.max_abs_logit_diff < 1e-5 and exact.extra["data"] == str(m[records])
    lost = check(m["adapter"], m["text_only"], base=m["base"], data=m[records])
    on_text = check(m["adapter"], m["text_only"], base=m["base"])
    assert on_text.metrics.max_abs_logit_diff < 1e-5  # text never reaches the vision tower
    assert lost.metrics.max_abs_logit_diff > 100 * max(exact.metrics.max_abs_logit_diff, 1e-6)
    assert lost.metrics.mean_kl > 1000 * max(exact.metrics.mean_kl, 1e-12)


def _cli_check(llava, data, *more):
    args = [
        "check",
        llava["adapter"],
        "--candidate",
        llava["merged"],
        "--base",
        llava["base"],
        "--data",
        data,
    ]
    return CliRunner().invoke(cli, [str(a) for a in (*args, *more)])


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_on_image_records(models, family, monkeypatch):
    """--generate completes each record's prompt with its image: the exact merge answers as the unmerged
    model does; the reference's completions are transformers' generate on PEFT's unmerged model over the
    base bitsandbytes quantizes, fed the same prompt and image. The processor is loaded once per check."""
    m = models(family)
    import transformers
    from peft import PeftModel
    from PIL import Image
    from transformers import AutoProcessor

    import qmerge.verify.check as check_module
    from qmerge.verify.generate import hf_complete
    from tests.helpers import bnb_config

    loaded = []
    load = check_module.load_processor
    monkeypatch.setattr(check_module, "load_processor", lambda *a: loaded.append(a) or load(*a))
    report = check(
        m["adapter"],
        m["merged"],
        base=m["base"],
        data=m["data"],
        generate=2,
        max_new_tokens=8,
    )
    task = report.extra["task"]
    assert task["prompts"] == 2 and task["agreement"] == 1.0
    assert len(loaded) == 1  # for the scored records and the prompts alike
    processor = AutoProcessor.from_pretrained(m["base"])
    base = getattr(transformers, CLASSES[family]).from_pretrained(
        str(m["base"]), quantization_config=bnb_config(), device_map="cpu"
    )
    peft = PeftModel.from_pretrained(base.dequantize().float(), str(m["adapter"])).eval()
    for row in m["data"].read_text().splitlines():
        image, question = json.loads(row)["messages"][0]["content"]
        (c,) = [c for c in task["agreeing"] if question["text"] in c["prompt"]]
        assert c["prompt"].count(MARKER[family]) == 1 and c["expected"]
        enc = processor(
            text=[c["prompt"]],
            images=[Image.open(m["data"].parent / image["path"])],
            add_special_tokens=False,
            return_tensors="pt",
        )
        assert c["reference"] == hf_complete(peft, processor.tokenizer, [c["prompt"]], 8, [dict(enc)])[0]


def test_check_cli_json_on_image_records(llava):
    r = _cli_check(llava, llava["data"], "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["passed"] and report["data"] == str(llava["data"]) and report["metrics"]["n_tokens"] > 0
    missing = llava["data"].parent / "missing.jsonl"
    missing.write_text(llava["data"].read_text().replace("img0.png", "gone.png"))
    r = _cli_check(llava, missing)
    assert r.exit_code == 1 and "gone.png does not exist" in r.output and "Traceback" not in r.output


def test_image_records_refused_with_the_reason(llava, tmp_path):
    """What check cannot do with image records is refused with what to do (a GGUF candidate before any
    model runs)."""
    args = (llava["adapter"], llava["merged"])
    gguf = tmp_path / "m.gguf"
    export(llava["adapter"], "gguf", gguf, base=llava["base"])
    with pytest.raises(UnsupportedError, match="does not feed it\\s+images"):
        check(llava["adapter"], gguf, base=llava["base"], data=llava["data"])
    missing = tmp_path / "missing.jsonl"
    row = json.loads(llava["data"].read_text().splitlines()[0])
    row["messages"][0]["content"][0]["path"] = "nowhere.png"
    missing.write_text(json.dumps(row) + "\n")
    with pytest.raises(InputError, match=r"missing.jsonl:1: the image .*nowhere.png does not exist"):
        check(*args, base=llava["base"], data=missing)
    extra = llava["data"].parent / "extra.jsonl"  # beside the images
    row = json.loads(llava["data"].read_text().splitlines()[0])
    extra.write_text(json.dumps({**row, "images": ["img1.png"]}) + "\n")
    with pytest.raises(InputError, match="1 more image"):
        check(*args, base=llava["base"], data=extra)
    mixed = llava["data"].parent / "mixed.jsonl"
    mixed.write_text(llava["data"].read_text() + json.dumps({"instruction": "hi", "output": "hello"}) + "\n")
    with pytest.raises(InputError, match=r"mixed.jsonl:3: in a file with images every record must be a chat"):
        check(*args, base=llava["base"], data=mixed)
    plain = tmp_path / "base_without_processor"
    shutil.copytree(llava["base"], plain)
    (plain / "processor_config.json").unlink()
    with pytest.raises(InputError, match="has the processor that prepares them"):
        check(*args, base=plain, data=llava["data"])
    (plain / "processor_config.json").write_text("{not json")
    with pytest.raises(InputError, match="transformers cannot build this model's processor"):
        check(*args, base=plain, data=llava["data"])


def test_text_records_still_tokenized_as_train_does(llava):
    """A file without images keeps the text path (no processor, sequences batched)."""
    from transformers import AutoTokenizer

    from qmerge.verify.tokens import data_batch

    text = llava["data"].parent / "text.jsonl"
    text.write_text(json.dumps({"prompt": "what is in the picture?", "completion": " a fox"}) + "\n")
    batch = data_batch(
        AutoTokenizer.from_pretrained(llava["base"]), text, processor=lambda: pytest.fail("no")
    )
    assert batch.inputs is None and batch.scored.any() and torch.equal(batch.part(0, 1).tokens, batch.tokens)


def test_train_and_calibration_refuse_records_with_images(llava):
    """qmerge train and --calibrate tokenize with the tokenizer's chat template, which would drop the images
    without a word: such records are refused by their line."""
    from transformers import AutoTokenizer

    from qmerge.data import encode_record, read_jsonl

    row = read_jsonl(llava["trl"])[0]
    with pytest.raises(UnsupportedError, match=r"data.jsonl:1: this record holds images"):
        encode_record(row, AutoTokenizer.from_pretrained(llava["base"]), 512, f"{llava['trl']}:1")
