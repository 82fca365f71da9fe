"""Go's text/template, the part Ollama's chat templates use, rendered in Python.

qmerge writes Ollama TEMPLATEs and checks each one by rendering sample conversations both ways (the Jinja
chat template and this), so it follows Go's text/template rules: `{{-`/`-}}` trim the neighbouring text's
white space; `if`/`else if`/`else`/`range`/`with`/`end`, `break`/`continue`; `$x := p` declares, `$x = p`
assigns (an outer variable too, as Go 1.11+); the builtins and, or (returning an operand, short-circuit),
not, eq (true when the first equals any other), ne, lt, le, gt, ge, len, slice, index, print; truth as Go's
(false, 0, "", nil and empty collections are false). Dicts stand for Go maps (a missing key is its zero
value, Ollama's `missingkey=zero`); Message objects for api.Message structs. tests/chat/test_gotemplate.py
compares it with Go's own text/template where a Go toolchain is installed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .goparse import TemplateError, parse


@dataclass
class Message:
    """Ollama's api.Message as its templates see it (a struct: an unknown field is an error)."""

    Role: str
    Content: str
    Thinking: str = ""
    Images: list | None = None
    ToolCalls: list | None = None
    ToolName: str = ""


class _Stop(Exception):
    def __init__(self, kind):
        self.kind = kind


def truth(v) -> bool:
    if v is None or v is False:
        return False
    if isinstance(v, (int, float, str, list, tuple, dict)):
        return bool(v) if not isinstance(v, bool) else v
    return True


def _eq(a, *bs):
    return any(a == b for b in bs)


def _slice(v, *ix):
    return v[ix[0] : ix[1]] if len(ix) == 2 else v[ix[0] :] if ix else v


def _print(*vs):
    return "".join(_text(v) for v in vs)


_FUNCS = {
    "not": lambda v: not truth(v),
    "eq": _eq,
    "ne": lambda a, b: a != b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "len": len,
    "slice": _slice,
    "index": lambda v, *ks: _index(v, ks),
    "print": _print,
}


def _index(v, keys):
    for k in keys:
        v = v.get(k) if isinstance(v, dict) else v[k]
    return v


def _text(v) -> str:
    if v is None:
        return "<no value>"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _field(v, name):
    if isinstance(v, dict):
        return v.get(name)  # missingkey=zero: a map's missing key reads as its zero value
    if isinstance(v, Message):
        if not hasattr(v, name):
            raise TemplateError(f"can't evaluate field {name} in type api.Message")
        return getattr(v, name)
    raise TemplateError(f"can't evaluate field {name} in {type(v).__name__}")


class _Scope:
    def __init__(self, dot, vars):
        self.dot, self.vars = dot, vars  # vars: list of dicts, innermost last

    def get(self, name):
        for frame in reversed(self.vars):
            if name in frame:
                return frame[name]
        raise TemplateError(f"undefined variable {name}")

    def set(self, name, value):
        for frame in reversed(self.vars):
            if name in frame:
                frame[name] = value
                return
        raise TemplateError(f"undefined variable {name}")


def _operand(scope, kind, v):
    if kind == "str":
        try:
            return json.loads(v)  # qmerge writes its literals as JSON strings, which Go reads alike
        except ValueError:
            raise TemplateError(f"string {v} uses escapes this renderer does not read") from None
    if kind == "raw":
        return v[1:-1]
    if kind == "num":
        return int(v)
    if kind == "pipe":
        return _pipe(scope, v)
    if kind == "chained":
        out = _pipe(scope, v[0])
        for f in v[1].split(".")[1:]:
            out = _field(out, f)
        return out
    if kind == "var":
        name, *fields = v.split(".")
        out = scope.get(name)
    elif kind == "field":
        out, fields = scope.dot, [f for f in v.split(".") if f]
    elif kind == "ident" and v in ("true", "false", "nil"):
        return {"true": True, "false": False, "nil": None}[v]
    else:
        raise TemplateError(f"function {v!r} is not defined here")
    for f in fields:
        out = _field(out, f)
    return out


def _command(scope, cmd, piped=()):
    kind, v = cmd[0]
    if kind == "ident" and v in ("and", "or"):  # Go: the first operand that decides, else the last
        out = None
        for a in cmd[1:]:
            out = _operand(scope, *a)
            if truth(out) != (v == "and"):
                return out
        return out
    if kind == "ident" and v in _FUNCS:
        args = [_operand(scope, *a) for a in cmd[1:]] + list(piped)
        return _FUNCS[v](*args)
    if len(cmd) > 1 or piped:
        raise TemplateError(f"{v} is not a function")
    return _operand(scope, kind, v)


def _pipe(scope, cmds):
    out = ()
    for cmd in cmds:
        out = (_command(scope, cmd, out),)
    return out[0]


def _execute(nodes, scope, out):
    frame = {}
    scope.vars.append(frame)
    try:
        for n in nodes:
            _run(n, scope, out, frame)
    finally:
        scope.vars.pop()


def _run(n, scope, out, frame):
    if n.kind == "text":
        out.append(n.text)
    elif n.kind in ("break", "continue"):
        raise _Stop(n.kind)
    elif n.kind == "action":
        value = _pipe(scope, n.pipe)
        if n.decl and n.assign:
            scope.set(n.decl[0], value)
        elif n.decl:
            frame[n.decl[0]] = value
        else:
            out.append(_text(value))
    elif n.kind in ("if", "with"):
        value = _pipe(scope, n.pipe)
        if n.decl:
            frame[n.decl[0]] = value
        if truth(value):
            inner = _Scope(value if n.kind == "with" else scope.dot, scope.vars)
            _execute(n.body, inner, out)
        else:
            _execute(n.orelse, scope, out)
    else:
        _range(n, scope, out)


def _range(n, scope, out):
    items = _pipe(scope, n.pipe) or []
    pairs = list(items.items()) if isinstance(items, dict) else list(enumerate(items))
    if not pairs:
        _execute(n.orelse, scope, out)
    for k, v in pairs:
        names = (
            dict(zip(n.decl, [k, v], strict=False))
            if len(n.decl) == 2
            else dict(zip(n.decl, [v], strict=False))
        )
        scope.vars.append(names)
        try:
            _execute(n.body, _Scope(v, scope.vars), out)
        except _Stop as stop:
            if stop.kind == "break":
                break
        finally:
            scope.vars.pop()


def render(template: str, data: dict) -> str:
    """`template` executed on `data` as Go's text/template would (for the part this module implements)."""
    out: list[str] = []
    scope = _Scope(data, [{"$": data}])
    _execute(parse(template), scope, out)
    return "".join(out)
