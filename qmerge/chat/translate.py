"""A model's Jinja chat template as an Ollama TEMPLATE (Go's text/template), checked by rendering.

No template is matched by name or guessed. qmerge renders the Jinja template (through the caller's
renderer: transformers' apply_chat_template) on conversations with marked contents and reads off the
text around each role's content: the role markers, the generation prompt, a default system prompt, a
BOS the template writes, and where a system message goes (its own turn, or folded into the first or the
last user message, as Gemma and Mistral templates do). From those it writes a Go template, then renders
sample conversations both ways, the Go side as Ollama runs it (the Modelfile's SYSTEM when the request
has none, consecutive messages of one role joined, llama.cpp's BOS), and keeps the translation only when
every sample renders to the same text. Otherwise the reason is said and no TEMPLATE is written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .ollama import ChatFormat, go_template, ollama_prompt

# render(messages, add_generation_prompt) -> text, as the model's Jinja chat template writes it
Renderer = Callable[[list[dict], bool], str]

_U1, _U2, _A1, _S = "QMERGE_USER_1", "QMERGE_USER_2", "QMERGE_ASSISTANT_1", "QMERGE_SYSTEM"
_SEPARATORS = ("\n\n", "\n", " ", "")
SAMPLES = (
    [{"role": "user", "content": "What is the capital of France?\nAnswer in one word."}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name a prime number greater than 10."},
    ],
    [
        {"role": "user", "content": "Translate 'good morning' to Italian."},
        {"role": "assistant", "content": "Buongiorno."},
        {"role": "user", "content": "And 'good night'?"},
    ],
    [
        {"role": "system", "content": "Answer in French.\nBe brief."},
        {"role": "user", "content": "How many legs has a spider?"},
        {"role": "assistant", "content": "Huit."},
        {"role": "user", "content": "And an ant?"},
        {"role": "assistant", "content": "Six."},
        {"role": "user", "content": "Merci — et un escargot ?"},
    ],
)
_FAMILIES = (  # display names, by the markers the template writes
    ("<|im_start|>", "chatml"),
    ("<|start_header_id|>", "llama3"),
    ("<start_of_turn>", "gemma"),
    ("[INST]", "mistral"),
    ("<|user|>", "phi3"),
)


@dataclass(frozen=True)
class Translation:
    """The Ollama side of a chat template: TEMPLATE, SYSTEM and stop strings, or why there is none."""

    template: str | None
    family: str
    stop: tuple[str, ...] = ()
    system: str = ""
    reason: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        return {
            "translated": self.template is not None,
            "family": self.family,
            "stop": list(self.stop),
            "system": self.system or None,
            "reason": self.reason,
            "notes": list(self.notes),
        }


class _Mismatch(Exception):
    pass


def _around(text: str, mark: str) -> tuple[str, str]:
    if text.count(mark) != 1:
        raise _Mismatch(f"the template writes the content {text.count(mark)} times, not once")
    head, tail = text.split(mark)
    return head, tail


def _strip_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise _Mismatch(f"{what}: expected {prefix!r} at the start of {text!r}")
    return text[len(prefix) :]


def _strip_suffix(text: str, suffix: str, what: str) -> str:
    if suffix and not text.endswith(suffix):
        raise _Mismatch(f"{what}: expected {suffix!r} at the end of {text!r}")
    return text[: len(text) - len(suffix)]


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _cut(text: str, at: int, special: list[str]) -> int:
    """`at`, moved back to the start of a special token of `text` it would split."""
    for t in special:
        start = text.find(t)
        while t and start != -1:
            if start < at < start + len(t):
                return _cut(text, start, special)
            start = text.find(t, start + 1)
    return at


def _common_prefix(a: str, b: str, special: list[str]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return min(_cut(a, n, special), _cut(b, n, special))


def _common_suffix(a: str, b: str, special: list[str]) -> int:
    """Length of the common tail of a and b that starts at a whole token of each."""
    n = 0
    while n < min(len(a), len(b)) and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    while n and (_cut(a, len(a) - n, special) != len(a) - n or _cut(b, len(b) - n, special) != len(b) - n):
        n -= 1
    return n


def read_format(jinja: Renderer, bos: str, add_bos: bool, special: list[str] = ()) -> ChatFormat:
    """The role markers of the template `jinja` renders (raises _Mismatch where it is not role-shaped).

    The marker after a user message is read from a conversation that ends there without a generation
    prompt; a template that writes something else there (an EOS) is split where the texts after a user
    message differ, at a token boundary. Alike for the marker after an assistant message."""
    special = list(special)
    u, a, u2 = _msg("user", _U1), _msg("assistant", _A1), _msg("user", _U2)
    head_u, tail = _around(jinja([u], True), _U1)
    _, g1, g2, end = _parts(jinja([u, a, u2], True))
    if end != tail:
        raise _Mismatch(f"the text after the last user message differs: {end!r} vs {tail!r}")
    u_s = _around(jinja([u], False), _U1)[1]
    if not (g1.startswith(u_s) and tail.startswith(u_s)):
        u_s = g1[: _common_prefix(g1, tail, special)]
    a_p, gen = g1[len(u_s) :], tail[len(u_s) :]
    a_s = _around(jinja([u, a], False), _A1)[1]
    if not (g2.startswith(a_s) and head_u.endswith(g2[len(a_s) :])):
        a_s = g2[: len(g2) - _common_suffix(g2, head_u, special)]
    u_p = g2[len(a_s) :]
    pre = _strip_suffix(head_u, u_p, "the first user turn")
    lead = bos if bos and pre.startswith(bos) else ""
    fmt = ChatFormat(lead, (u_p, u_s), (a_p, a_s), gen)
    fmt = _read_system(jinja, fmt, pre[len(lead) :], special)
    return _replace(fmt, lead=fmt.lead[len(bos) :] if add_bos and lead else fmt.lead)


def _parts(text: str) -> tuple[str, str, str, str]:
    """The texts around U1, A1 and U2 in a rendered user/assistant/user conversation."""
    head, rest = _around(text, _U1)
    g1, rest = _around(rest, _A1)
    g2, end = _around(rest, _U2)
    return head, g1, g2, end


def _read_system(jinja: Renderer, fmt: ChatFormat, pre: str, special: list[str]) -> ChatFormat:
    """Where the template puts a system message, and what it writes without one (`pre`, after the lead)."""
    u_p = fmt.user[0]
    try:
        with_system = jinja([_msg("system", _S), _msg("user", _U1)], False)
    except Exception:  # the template refuses system messages (raise_exception)
        if pre:
            raise _Mismatch(
                f"it writes {pre!r} before the first user turn and refuses system messages"
            ) from None
        return _replace(fmt, system_kind="none")
    if _S not in with_system:
        raise _Mismatch("a system message's content does not appear in the rendered text")
    x, y = _around(_strip_prefix(with_system, fmt.lead, "the BOS"), _S)
    for sep in _SEPARATORS:  # folded into a user message: "<user marker>SYSTEM<sep>USER"
        if y.startswith(sep + _U1) and x == pre + u_p:
            return _read_folded(jinja, fmt, sep)
    y = _strip_suffix(_around(y, _U1)[0], u_p, "the user turn after the system turn")
    if not pre:
        return _replace(fmt, system=(x, y))
    if pre.startswith(x) and pre.endswith(y) and len(pre) >= len(x) + len(y):
        default = pre[len(x) : len(pre) - len(y)]  # the template's default system prompt, maybe empty
        return _replace(fmt, system=(x, y), default_system=default, system_always=not default)
    n = _common_prefix(pre, x, special)  # text written before any turn ("[gMASK]<sop>")
    if pre[n:]:
        raise _Mismatch(f"it writes {pre[n:]!r} before the first user turn, which is no system turn")
    return _replace(fmt, lead=fmt.lead + pre[:n], system=(x[n:], y))


def _read_folded(jinja: Renderer, fmt: ChatFormat, sep: str) -> ChatFormat:
    """A system prompt folded into the first user message, or into the last (Mistral's newer templates)."""
    conv = [_msg("system", _S), _msg("user", _U1), _msg("assistant", _A1), _msg("user", _U2)]
    text = jinja(conv, False)
    for kind, folded in (
        ("first_user", [_msg("user", _S + sep + _U1), *conv[2:]]),
        ("last_user", [*conv[1:3], _msg("user", _S + sep + _U2)]),
    ):
        if jinja(folded, False) == text:
            return _replace(fmt, system_kind=kind, separator=sep)
    raise _Mismatch("it folds the system prompt into a user message neither first nor last")


def _replace(fmt: ChatFormat, **kw) -> ChatFormat:
    return ChatFormat(**{**fmt.__dict__, **kw})


def _stops(fmt: ChatFormat, special: list[str], bos: str) -> tuple[str, ...]:
    """Stop strings: the special tokens in the role markers (not BOS), in the order they appear; for
    plain-text markers, the user marker's first line."""
    markers = "".join([*fmt.system, *fmt.user, *fmt.assistant, fmt.generation])
    found = sorted({t for t in special if t and t != bos and t in markers}, key=markers.index)
    if found:
        return tuple(found)
    first = fmt.user[0].strip().split("\n")[0]
    return (first,) if first else ()


def _short(text: str, n: int = 160) -> str:
    """repr of `text`, its middle cut beyond n characters (a reason stays one readable line)."""
    return repr(text) if len(text) <= n else repr(text[: n // 2]) + " ... " + repr(text[-n // 2 :])


def family_of(text: str) -> str:
    """A display name for the template family whose markers `text` holds ("other" for the rest)."""
    return next((name for marker, name in _FAMILIES if marker in text), "other")


def translate(
    jinja: Renderer, chat_template: str, special: list[str], bos: str = "", add_bos: bool = False
) -> Translation:
    """The Ollama TEMPLATE, SYSTEM and stops for a chat template, kept only when every sample conversation
    renders the same both ways; else a Translation whose `reason` says why not."""
    family = family_of(chat_template)
    try:
        fmt = read_format(jinja, bos, add_bos, special)
    except _Mismatch as e:
        return Translation(None, family, reason=f"its structure was not recognized ({e})")
    except Exception as e:  # the template itself fails on a plain conversation
        return Translation(None, family, reason=f"rendering it failed ({type(e).__name__}: {e})")
    if '"""' in "".join([*fmt.system, *fmt.user, *fmt.assistant, fmt.generation, fmt.default_system]):
        return Translation(None, family, reason='its markers contain """, which a Modelfile cannot quote')
    family = family_of("".join([*fmt.system, *fmt.user, *fmt.assistant, fmt.generation]))
    template, notes = go_template(fmt), []
    for conv in SAMPLES:
        if fmt.system_kind == "none" and conv[0]["role"] == "system":
            continue
        want = jinja(conv, True)
        got = (bos if add_bos else "") + ollama_prompt(template, conv, fmt.default_system)
        if want != got:
            if add_bos and not want.startswith(bos) and got[len(bos) :] == want:
                notes.append(
                    f"llama.cpp starts each prompt with {bos}, which the chat template does not write"
                )
                continue
            return Translation(
                None,
                family,
                reason="the translation renders a sample conversation differently: "
                f"{_short(got)} vs {_short(want)}",
            )
    if fmt.system_kind == "none":
        notes.append("the chat template refuses system messages; the Ollama template leaves them out")
    if "strftime_now" in chat_template:
        notes.append(
            "the chat template writes today's date; the Ollama template keeps the date of this export"
        )
    return Translation(
        template, family, _stops(fmt, special, bos), fmt.default_system, None, tuple(dict.fromkeys(notes))
    )
