"""The Ollama side: a Go template written from a ChatFormat, and the prompt Ollama's chat endpoint renders
with it (server side: the Modelfile's SYSTEM, collate; llama.cpp adds BOS itself)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from .gotemplate import Message, render


@dataclass(frozen=True)
class ChatFormat:
    """The text around each role's content, as read off the Jinja template's output."""

    lead: str  # written once at the start (a BOS llama.cpp does not add itself)
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str
    system: tuple[str, str] = ("", "")
    system_kind: str = "turn"  # turn | first_user | last_user | none
    separator: str = ""  # between a folded system prompt and the user's content
    default_system: str = ""  # the prompt the template writes when a conversation has none
    system_always: bool = False  # the system turn is written (empty) without a system message


def _literal(text: str) -> str:
    """`text` as a Go string literal action (JSON's escapes are Go's; braces escaped for the lexer)."""
    if not text:
        return ""
    quoted = json.dumps(text, ensure_ascii=False).replace("{{", "{\\u007b").replace("}}", "}\\u007d")
    return "{{ " + quoted + " }}"


def go_template(fmt: ChatFormat) -> str:
    """The Go template that writes what `fmt` describes, for Ollama's .System/.Messages."""
    lines = [_literal(fmt.lead)] if fmt.lead else []
    if fmt.system_kind == "first_user":
        lines.append("{{- $system := $.System }}")
    if fmt.system_always:
        lines.append(
            "{{- if not $.System }}" + _literal(fmt.system[0]) + _literal(fmt.system[1]) + "{{ end }}"
        )
    lines.append("{{- range $i, $_ := .Messages }}")
    lines.append("{{- $last := eq (len (slice $.Messages $i)) 1 }}")
    if fmt.system_kind == "turn":
        lines.append(
            '{{- if eq .Role "system" }}'
            + _literal(fmt.system[0])
            + "{{ .Content }}"
            + _literal(fmt.system[1])
        )
        lines.append('{{- else if eq .Role "user" }}' + _literal(fmt.user[0]))
    else:
        lines.append('{{- if eq .Role "user" }}' + _literal(fmt.user[0]))
    if fmt.system_kind == "first_user":
        lines.append(
            "{{- if $system }}{{ $system }}" + _literal(fmt.separator) + '{{ $system = "" }}{{ end }}'
        )
    if fmt.system_kind == "last_user":
        lines.append("{{- $later := false }}{{ range $j, $m := slice $.Messages $i }}")
        lines.append('{{- if and $j (eq $m.Role "user") }}{{ $later = true }}{{ end }}{{ end }}')
        lines.append(
            "{{- if and $.System (not $later) }}{{ $.System }}" + _literal(fmt.separator) + "{{ end }}"
        )
    lines.append(
        "{{- .Content }}" + _literal(fmt.user[1]) + "{{ if $last }}" + _literal(fmt.generation) + "{{ end }}"
    )
    lines.append(
        '{{- else if eq .Role "assistant" }}'
        + _literal(fmt.assistant[0])
        + "{{ .Content }}"
        + _literal(fmt.assistant[1])
    )
    lines += ["{{- end }}", "{{- end }}"]
    return "\n".join(lines)


def collate(messages: list[dict]) -> tuple[str, list[Message]]:
    """Ollama's collate: every system message's content joined for .System; consecutive messages of one
    role joined with a blank line (tool messages kept apart)."""
    system, out = [], []
    for m in messages:
        if m["role"] == "system":
            system.append(m["content"])
        if out and out[-1].Role == m["role"] and m["role"] != "tool":
            out[-1].Content += "\n\n" + m["content"]
        else:
            out.append(Message(m["role"], m["content"]))
    return "\n\n".join(system), out


def ollama_prompt(template: str, messages: list[dict], system: str = "") -> str:
    """The prompt Ollama's chat endpoint renders: the Modelfile's SYSTEM first when the request has no
    system message, then the template on .System and .Messages (BOS not included: llama.cpp adds it)."""
    if system and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    joined, collated = collate(messages)
    data = {"System": joined, "Messages": collated, "Tools": None, "Response": "", "Think": False}
    return render(template, data)
