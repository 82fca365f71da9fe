"""qmerge.chat.gotemplate renders as Go's text/template does: against Go itself where a Go toolchain is
installed, on Ollama-style templates that use each construct; and on fixed cases whose output Go's rules
decide (these run everywhere)."""

from __future__ import annotations

import pytest

from qmerge.chat.gotemplate import Message, TemplateError, render
from qmerge.chat.translate import SAMPLES
from tests.chat.conftest import ollama_case

TEMPLATES = [
    # ChatML in Ollama's own style: trim markers around literal text, $last from slice/len
    """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
<|im_start|>{{ .Role }}
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_end|>
<|im_start|>assistant
{{ end }}
{{- end }}""",
    # Llama 3 as Ollama's docs write it
    """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

""",
    # and/or return an operand; eq with several; else-if chains; with; range-else; comments; print; index
    """{{/* a comment */}}{{ or .System "no system" }}|{{ and .System "both" }}|{{ len .Messages }}
{{- range $i, $m := .Messages }}[{{ $i }}:{{ if eq $m.Role "user" "system" }}U/S{{ else if eq $m.Role "assistant" }}A{{ else }}?{{ end }}]
{{- with $m.Content }}({{ . }}){{ end }}{{ end }}{{ range .Tools }}tool{{ else }} no tools{{ end }}
{{- print " " (index $.Messages 0).Role " " 3 " " true }}{{ .Missing }}""",
    # outer variables assigned in a loop; break and continue; nested ranges over a slice; not/gt/lt
    """{{- $n := 0 }}{{ $seen := "" }}{{ range $i, $m := .Messages }}{{ if eq $m.Role "system" }}{{ continue }}{{ end }}
{{- $n = $i }}{{ $seen = print $seen $m.Role "," }}{{ if gt $i 2 }}{{ break }}{{ end }}
{{- range $j, $k := slice $.Messages $i }}{{ if and $j (not (lt $j 1)) }}+{{ end }}{{ end }}{{ end }}{{ $n }} {{ $seen }}""",
    # literals qmerge writes: JSON-quoted strings with escapes, braces escaped for the lexer
    """{{ "line\\n\\ttab \\"q\\" {\\u007b x }\\u007d é" }}{{ range .Messages }}{{ "<" }}{{ .Content }}{{ ">\\n" }}{{ end }}""",
]


def _cases():
    for t in TEMPLATES:
        for conv in SAMPLES:
            for system in ("", "Default system\nprompt."):
                yield ollama_case(t, conv, system)


def test_python_renderer_equals_go(go_render):
    cases = list(_cases())
    want = go_render(cases)
    for case, w in zip(cases, want, strict=True):
        assert "error" not in w, (case["template"], w)
        data = {
            "System": case["system"],
            "Messages": [Message(m["role"], m["content"]) for m in case["messages"]],
        }
        data |= {"Tools": None, "Response": "", "Think": False}
        assert render(case["template"], data) == w["out"], case["template"]


def _data(*roles, system=""):
    return {"System": system, "Messages": [Message(r, r.upper()) for r in roles], "Tools": None}


@pytest.mark.parametrize(
    "template, data, want",
    [
        ("a  {{- 1 -}}  b", {}, "a1b"),
        ("a {{ 1 }} b", {}, "a 1 b"),
        ("x\n{{- if .System }}S{{ else }}none{{ end }}\ny", _data(), "xnone\ny"),
        ('{{ or .System .Nope "d" }}', _data(), "d"),
        ('{{ and 1 0 2 }}{{ and 1 2 }}{{ or 0 "" }}', {}, "02"),
        ("{{ range .Messages }}{{ .Role }}{{ end }}", _data("user", "assistant"), "userassistant"),
        ("{{ range $i, $_ := .Messages }}{{ $i }}{{ end }}", _data("a", "b", "c"), "012"),
        ("{{ len (slice .Messages 1) }}", _data("a", "b", "c"), "2"),
        ("{{ .Nope }}", {}, "<no value>"),
        ("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ end }}{{ $x }}", {}, "2"),
        (
            '{{ range .Messages }}{{ if eq .Role "b" }}{{ break }}{{ end }}{{ .Role }}{{ end }}',
            _data("a", "b", "c"),
            "a",
        ),
        ('{{ "\\u007b\\u007b" }}', {}, "{{"),
    ],
)
def test_go_rules(template, data, want):
    assert render(template, data) == want


@pytest.mark.parametrize(
    "template",
    ["{{ if .System }}x", "{{ end }}", "{{ nofunc 1 }}", "{{ .Messages.0 }}", "{{ $undefined }}"],
)
def test_what_go_refuses_is_refused(template):
    with pytest.raises(TemplateError):
        render(template, _data("user"))


def test_an_unknown_message_field_is_an_error_as_in_go():
    with pytest.raises(TemplateError, match="Nope"):
        render("{{ range .Messages }}{{ .Nope }}{{ end }}", _data("user"))
