"""Chat templates translated to Ollama TEMPLATEs: sample conversations render to the same text both ways,
the Jinja template (transformers' renderer) and the Go template as Ollama runs it (SYSTEM default, collate,
llama.cpp's BOS); by qmerge's renderer everywhere and by Go's own text/template where Go is installed.
Templates: a few written here (ChatML with a default system prompt, Llama 3, system folded into the first
or last user turn, system refused) and real models' from llama.cpp's collection."""

from __future__ import annotations

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from qmerge.chat.ollama import ollama_prompt
from qmerge.chat.translate import SAMPLES, translate
from tests.chat.conftest import ollama_case

CHATML_DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
FOLDED_FIRST = (  # Gemma 3's way: the system prompt opens the first user turn
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for m in loop_messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + m['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
FOLDED_LAST = (  # Mistral's newer way: the system prompt goes into the last user turn
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set loop_messages = "
    "messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}{{ bos_token }}"
    "{% for m in loop_messages %}{% if m['role'] == 'user' %}{% if loop.last and system %}"
    "{{ '[INST] ' + system + '\\n\\n' + m['content'] + '[/INST]' }}{% else %}{{ '[INST] ' + m['content'] + '[/INST]' }}"
    "{% endif %}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
NUMBERED = (  # the user marker carries the turn's number: no fixed marker to translate
    "{% for m in messages %}{{ '### ' + m['role'] + ' ' + loop.index|string + ':\\n' + m['content'] + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)
SPECIAL = ["<s>", "</s>", "<bos>", "<|begin_of_text|>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>"]
SPECIAL += ["<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>", "[INST]", "[/INST]"]
SPECIAL += ["<|user|>", "<|assistant|>", "<|end|>"]
OWN = {  # name: (template, bos, llama.cpp adds BOS, stops wanted)
    "chatml": (CHATML_DEFAULT_SYSTEM, "", False, ("<|im_start|>", "<|im_end|>")),
    "llama3": (LLAMA3, "<|begin_of_text|>", True, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "gemma": (FOLDED_FIRST, "<bos>", True, ("<start_of_turn>", "<end_of_turn>")),
    "mistral": (FOLDED_LAST, "<s>", True, ("[INST]", "[/INST]", "</s>")),
    "phi3": (NO_SYSTEM, "<s>", False, ("<|end|>", "<|assistant|>")),
}


def jinja_of(template: str, bos: str):
    def jinja(messages, generation):
        out, _ = render_jinja_template(
            conversations=[messages],
            chat_template=template,
            add_generation_prompt=generation,
            bos_token=bos,
            eos_token="</s>",
        )
        return out[0]

    return jinja


def _samples(tr):
    return [c for c in SAMPLES if not (c[0]["role"] == "system" and tr.notes and "refuses" in tr.notes[-1])]


@pytest.mark.parametrize("name", OWN)
def test_translation_renders_as_the_jinja_template(name):
    template, bos, add_bos, stops = OWN[name]
    jinja = jinja_of(template, bos)
    tr = translate(jinja, template, SPECIAL, bos, add_bos)
    assert tr.template is not None, tr.reason
    assert tr.family == name and set(tr.stop) >= set(stops)
    for conv in _samples(tr):
        assert (bos if add_bos else "") + ollama_prompt(tr.template, conv, tr.system) == jinja(conv, True)


def test_default_system_prompt_becomes_system():
    tr = translate(jinja_of(CHATML_DEFAULT_SYSTEM, ""), CHATML_DEFAULT_SYSTEM, SPECIAL)
    assert tr.system == "You are a helpful assistant."


def test_refused_system_messages_are_said():
    tr = translate(jinja_of(NO_SYSTEM, "<s>"), NO_SYSTEM, SPECIAL, "<s>")
    assert tr.template is not None and any("refuses system messages" in n for n in tr.notes)


def test_a_template_it_cannot_translate_is_said_not_guessed():
    tr = translate(jinja_of(NUMBERED, ""), NUMBERED, SPECIAL)
    assert tr.template is None and "not recognized" in tr.reason
    broken = "{{ messages[0]['content'] + messages[5]['content'] }}"
    tr = translate(jinja_of(broken, ""), broken, SPECIAL)
    assert tr.template is None and tr.reason.startswith("rendering it failed")


@pytest.mark.parametrize("name", OWN)
def test_go_renders_the_translation_as_the_jinja_template(go_render, name):
    template, bos, add_bos, _ = OWN[name]
    jinja = jinja_of(template, bos)
    tr = translate(jinja, template, SPECIAL, bos, add_bos)
    convs = _samples(tr)
    got = go_render([ollama_case(tr.template, c, tr.system) for c in convs])
    for conv, g in zip(convs, got, strict=True):
        assert (bos if add_bos else "") + g["out"] == jinja(conv, True)


REAL = {  # llama.cpp's collection: file, BOS, whether llama.cpp adds it (their GGUFs' add_bos_token)
    "Qwen-Qwen2.5-7B-Instruct.jinja": ("<|endoftext|>", False),
    "meta-llama-Llama-3.1-8B-Instruct.jinja": ("<|begin_of_text|>", True),
    "meta-llama-Llama-3.2-3B-Instruct.jinja": ("<|begin_of_text|>", True),
    "meta-llama-Llama-3.3-70B-Instruct.jinja": ("<|begin_of_text|>", True),
    "google-gemma-2-2b-it.jinja": ("<bos>", True),
    "microsoft-Phi-3.5-mini-instruct.jinja": ("<s>", False),
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": ("<s>", True),
    "HuggingFaceTB-SmolLM3-3B.jinja": ("", False),
}


@pytest.mark.parametrize("name", REAL)
def test_real_models_templates(llama_cpp_templates, go_render, name):
    bos, add_bos = REAL[name]
    template = (llama_cpp_templates / name).read_text(encoding="utf-8")
    jinja = jinja_of(template, bos)
    tr = translate(jinja, template, SPECIAL, bos, add_bos)
    assert tr.template is not None, tr.reason
    convs = _samples(tr)
    for conv, g in zip(
        convs, go_render([ollama_case(tr.template, c, tr.system) for c in convs]), strict=True
    ):
        assert (bos if add_bos else "") + g["out"] == jinja(conv, True)


def test_every_accepted_translation_renders_alike_in_go(llama_cpp_templates, go_render):
    """Over llama.cpp's whole collection: whatever translate() accepts, Go renders as the Jinja template."""
    accepted = 0
    for path in sorted(llama_cpp_templates.glob("*.jinja")):
        template = path.read_text(encoding="utf-8")
        jinja = jinja_of(template, "<s>")
        tr = translate(jinja, template, SPECIAL, "<s>", False)
        if tr.template is None:
            continue
        accepted += 1
        convs = _samples(tr)
        for conv, g in zip(
            convs, go_render([ollama_case(tr.template, c, tr.system) for c in convs]), strict=True
        ):
            assert g.get("out") == jinja(conv, True), path.name
    assert accepted >= 40
