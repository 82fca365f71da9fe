"""Go's text/template syntax, the part Ollama's chat templates use: text and actions (trim markers
applied), pipelines, declarations and assignments, if/else if/else/range/with/end, break/continue. The tree
gotemplate.py executes."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import InputError


class TemplateError(InputError):
    """A template this renderer cannot parse or execute (Go would refuse it too, or it uses more of Go)."""


_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<raw>`[^`]*`)|(?P<num>-?\d+)|(?P<decl>:=)|(?P<assign>=)'
    r"|(?P<punct>[(),|])|(?P<chain>(?<=\))(?:\.[A-Za-z0-9_]+)+)|(?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)|(?P<field>(?:\.[A-Za-z0-9_]+)+|\.)"
    r"|(?P<ident>[A-Za-z_][A-Za-z0-9_]*))"
)


@dataclass
class _Node:
    kind: str  # text | action | if | range | with | break | continue
    text: str = ""
    pipe: list = field(default_factory=list)
    decl: list[str] = field(default_factory=list)
    assign: bool = False
    body: list = field(default_factory=list)
    orelse: list = field(default_factory=list)


def _tokens(src: str) -> list[tuple[str, str]]:
    out, pos, src = [], 0, src.strip()
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if not m or m.end() == pos:
            raise TemplateError(f"cannot parse {src[pos:]!r} in {{{{ {src} }}}}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _split(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)] with Go's trim markers applied to the neighbouring text."""
    parts, pos, trim_next = [], 0, False
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        parts.append(("text", text))
        body = m.group(2)
        if not body.startswith("/*"):
            parts.append(("action", body))
        trim_next, pos = bool(m.group(3)), m.end()
    tail = template[pos:]
    parts.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
    return [p for p in parts if p != ("text", "")]


def parse(template: str) -> list[_Node]:
    """The template's tree (raises TemplateError on what Go's parser would refuse, as far as used here)."""
    parts = _split(template)
    nodes, end = _parse_list(parts, 0, top=True)
    return nodes


def _parse_list(parts, i, top=False):
    nodes = []
    while i < len(parts):
        kind, s = parts[i]
        if kind == "text":
            nodes.append(_Node("text", text=s))
            i += 1
            continue
        toks = _tokens(s)
        head = toks[0][1] if toks and toks[0][0] == "ident" else None
        if head in ("end", "else"):
            if top:
                raise TemplateError(f"unexpected {{{{ {s.strip()} }}}}")
            return nodes, i
        if head in ("if", "range", "with"):
            node, i = _parse_block(head, toks[1:], parts, i + 1)
            nodes.append(node)
            continue
        if head in ("break", "continue"):
            nodes.append(_Node(head))
        else:
            nodes.append(_action(toks))
        i += 1
    if not top:
        raise TemplateError("missing {{ end }}")
    return nodes, i


def _parse_block(head, toks, parts, i):
    node = _action(toks, kind=head)
    node.body, i = _parse_list(parts, i)
    toks = _tokens(parts[i][1])
    if toks[0][1] == "else":
        if len(toks) > 1 and toks[1][1] == head == "if":  # else if: a nested if in the else branch
            inner, i = _parse_block("if", toks[2:], parts, i + 1)
            node.orelse = [inner]
            return node, i
        node.orelse, i = _parse_list(parts, i + 1)
        toks = _tokens(parts[i][1])
    if toks[0][1] != "end":
        raise TemplateError(f"expected {{{{ end }}}}, found {{{{ {parts[i][1].strip()} }}}}")
    return node, i + 1


def _action(toks, kind="action") -> _Node:
    node = _Node(kind)
    names = [v for k, v in toks if k == "var"]
    ops = [k for k, _ in toks]
    if "decl" in ops or "assign" in ops:
        at = ops.index("decl") if "decl" in ops else ops.index("assign")
        node.decl = names[: len([k for k in ops[:at] if k == "var"])]
        node.assign = "assign" in ops
        toks = toks[at + 1 :]
    node.pipe, rest = _parse_pipe(toks)
    if rest:
        raise TemplateError(f"unexpected {rest[0][1]!r}")
    return node


def _parse_pipe(toks):
    """A pipeline: commands separated by |; each command is a list of operands (a function first)."""
    cmds, cmd = [], []
    while toks:
        kind, v = toks[0]
        if kind == "punct" and v == ")":
            break
        toks = toks[1:]
        if kind == "punct" and v == "|":
            cmds.append(cmd)
            cmd = []
        elif kind == "punct" and v == "(":
            inner, toks = _parse_pipe(toks)
            if not toks or toks[0][1] != ")":
                raise TemplateError("missing )")
            toks = toks[1:]
            if toks and toks[0][0] == "chain":  # (pipeline).Field
                cmd.append(("chained", (inner, toks[0][1])))
                toks = toks[1:]
            else:
                cmd.append(("pipe", inner))
        else:
            cmd.append((kind, v))
    cmds.append(cmd)
    return cmds, toks
