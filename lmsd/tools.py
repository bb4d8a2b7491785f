"""Tool calling: what a model's chat template says about its tool-call format, the preamble for templates that know
nothing of tools, the JSON schema that forces a call (`tool_choice: "required"` or a named function), and reading
a model's output back into OpenAI `tool_calls`.

The format is recognised from the chat template, never from the file name (a fine-tune keeps its base's template):

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, once per call (Hermes, Qwen 2.5/3, and
  most templates that follow Hugging Face's tool-use convention);
- `llama3`: `<|python_tag|>` and/or a bare `{"name": ..., "parameters": {...}}` (Llama 3.1-3.3); several calls
  separated by `;`;
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or the newer `[TOOL_CALLS]name[ARGS]{...}`;
- `generic`: a template without tool support. The prompt gets `GENERIC_PREAMBLE`, and the answer is a call when it
  is JSON — `{"name", "arguments"}`, a list of those, or `{"tool_calls": [...]}` — possibly in a ```json fence.

In every format plain JSON is understood too (a grammar-forced call is plain JSON, and llama.cpp drops control
tokens such as `[TOOL_CALLS]` from the text). A call counts only when it names one of the request's functions and
its arguments are a JSON object; anything else stays text. `parse` never raises: malformed output is content.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

FAMILIES = ("hermes", "llama3", "mistral", "generic")

GENERIC_PREAMBLE = (
    "You can call these functions:\n{tools}\n\n"
    "To call a function, answer with only a JSON object, nothing before or after it: "
    '{{"name": <function name>, "arguments": <an object of its parameters>}}. '
    "To call several, answer with a JSON list of such objects. Otherwise answer normally."
)


def family(template: str | None) -> str:
    """The tool-call format a chat template uses."""
    t = template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or ("ipython" in t and "<|start_header_id|>" in t):
        return "llama3"
    return "generic"


def supports_tools(template: str | None) -> bool:
    """Whether the template renders `tools` itself (else the request's system message gets GENERIC_PREAMBLE)."""
    return bool(template) and re.search(r"\btools\b", template or "") is not None


def for_template(template: str | None, messages: list[dict[str, Any]],
                 tools: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and tools to render: as they are for a template that renders tools itself; for one that does
    not, no tools but GENERIC_PREAMBLE in the system message, the calls in the history written as the JSON the
    preamble asks for, and tool results as user messages where the template knows no `tool` role."""
    if supports_tools(template):
        return messages, tools
    preamble = GENERIC_PREAMBLE.format(tools="\n".join(json.dumps(t.get("function", t), ensure_ascii=False)
                                                       for t in tools))
    knows_tool_role = "tool" in (template or "")
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
            text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            out.append({"role": "assistant", "content": (m.get("content") or "") + text})
        elif m.get("role") == "tool" and not knows_tool_role:
            name = m.get("name") or m.get("tool_call_id") or "the function"
            out.append({"role": "user", "content": f"Result of {name}: {m.get('content', '')}"})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content")})
    if out and out[0].get("role") == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{preamble}".strip()}
    else:
        out.insert(0, {"role": "system", "content": preamble})
    return out, None


# ---------------------------------------------------------------- forcing a call


def call_schema(functions: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of an answer that is a call of one of `functions` (OpenAI `function` objects): for llama.cpp's
    grammar, so that even a small model answers with a call that parses and validates. With `parallel`, a list of
    one to eight calls."""
    one = [{"type": "object",
            "properties": {"name": {"const": f["name"]},
                           "arguments": f.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    call = one[0] if len(one) == 1 else {"anyOf": one}
    return {"type": "array", "items": call, "minItems": 1, "maxItems": 8} if parallel else call


# ---------------------------------------------------------------- reading the output


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"call_{uuid.uuid4().hex[:24]}"

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


_DECODER = json.JSONDecoder()
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_MISTRAL_NAMED = re.compile(r"\[TOOL_CALLS\]\s*([A-Za-z0-9_.\-]+)\s*\[ARGS\]\s*")


def parse(text: str, fmt: str, names: set[str]) -> tuple[str, list[ToolCall]]:
    """(content, calls) from a model's answer. Calls are read only when every one of them is well formed and names a
    function in `names`; otherwise the whole answer is content and the log says why."""
    try:
        content, calls = _parse(text, fmt)
    except _NotACall as exc:
        log.info("the model's answer is text, not a tool call: %s", exc)
        return text, []
    if not calls:
        return text, []
    unknown = [c.name for c in calls if c.name not in names]
    if unknown:
        log.info("the model called %s, which the request does not offer: answered as text", ", ".join(unknown))
        return text, []
    return content, calls


def markers(fmt: str) -> tuple[str, ...]:
    """Where a call may start in a stream of text: a tag anywhere, or (for JSON) the answer's first character."""
    return {"hermes": ("<tool_call>",), "mistral": ("[TOOL_CALLS]",), "llama3": ("<|python_tag|>",)}.get(fmt, ())


def starts_call(text: str) -> bool | None:
    """Whether an answer beginning with `text` is read as a plain-JSON call: True (JSON or a ``` fence), False, or
    None while it cannot tell yet (blank, or "`" / "``")."""
    head = text.lstrip()
    if head == "" or (len(head) < 3 and "```".startswith(head)):
        return None
    return head[0] in "[{" or head.startswith("```")


class _NotACall(ValueError):
    pass


def _parse(text: str, fmt: str) -> tuple[str, list[ToolCall]]:
    if fmt == "hermes" and "<tool_call>" in text:
        calls = [c for body in _HERMES.findall(text) for c in _calls(_json(body))]
        return _HERMES.sub("", text).strip(), calls
    if fmt == "mistral" and "[TOOL_CALLS]" in text:
        before, _, after = text.partition("[TOOL_CALLS]")
        if _MISTRAL_NAMED.match("[TOOL_CALLS]" + after):
            return before.strip(), _mistral_named("[TOOL_CALLS]" + after)
        return before.strip(), _calls(_json(after))
    if fmt == "llama3" and "<|python_tag|>" in text:
        before, _, after = text.partition("<|python_tag|>")
        return before.strip(), [c for part in _split_calls(after) for c in _calls(_json(part))]
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced[1]
    if not body or body[0] not in "[{":
        return text, []
    if fmt == "llama3" and ";" in body:
        return "", [c for part in _split_calls(body) for c in _calls(_json(part))]
    return "", _calls(_json(body))


def _split_calls(text: str) -> list[str]:
    """`{...}; {...}`: Llama 3's several calls in one answer."""
    parts: list[str] = []
    rest = text.strip()
    while rest:
        try:
            _value, end = _DECODER.raw_decode(rest)
        except ValueError as exc:
            raise _NotACall(f"not JSON: {exc}") from None
        parts.append(rest[:end])
        rest = rest[end:].lstrip().removeprefix(";").lstrip()
    return parts


def _mistral_named(text: str) -> list[ToolCall]:
    calls: list[ToolCall] = []
    rest = text
    while rest.strip():
        m = _MISTRAL_NAMED.match(rest)
        if not m:
            raise _NotACall("text after a [TOOL_CALLS] call")
        try:
            args, end = _DECODER.raw_decode(rest, m.end())
        except ValueError as exc:
            raise _NotACall(f"the arguments of {m[1]} are not JSON: {exc}") from None
        calls.append(_call(m[1], args))
        rest = rest[end:].lstrip()
    return calls


def _json(text: str) -> Any:
    text = text.strip()
    try:
        value, end = _DECODER.raw_decode(text)
    except ValueError as exc:
        raise _NotACall(f"not JSON: {exc}") from None
    if text[end:].strip():
        raise _NotACall("text after the JSON")
    return value


def _calls(value: Any) -> list[ToolCall]:
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        value = value["tool_calls"]
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _NotACall("an empty list")
    calls = []
    for item in items:
        if not isinstance(item, dict):
            raise _NotACall("a call is not an object")
        if isinstance(item.get("function"), dict):  # OpenAI's own shape, echoed back
            item = item["function"]
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise _NotACall("a call without a name")
        args = item["arguments"] if "arguments" in item else item.get("parameters", {})
        calls.append(_call(name, args))
    return calls


def _call(name: str, args: Any) -> ToolCall:
    if isinstance(args, str):  # arguments given as JSON text
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            raise _NotACall(f"the arguments of {name} are not JSON") from None
    if not isinstance(args, dict):
        raise _NotACall(f"the arguments of {name} are not an object")
    return ToolCall(name, json.dumps(args, ensure_ascii=False))


# ---------------------------------------------------------------- streaming

_MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")  # every format's: the stream starts before `done` says


class ToolStream:
    """A streamed answer that may turn into tool calls. Text goes on to the client as content until a call may have
    begun — a format's tag, or JSON (or a ```json fence) as the answer's first character — and from there it is held
    and read at the end (`finish`). A held answer that is no call after all is sent as content then: nothing is
    lost, it only comes later."""

    def __init__(self) -> None:
        self.held = ""
        self.calling = False  # a call may have begun: everything from there is held
        self.sent = False  # content other than whitespace went out

    def feed(self, text: str) -> str:
        """The content to send now."""
        held = self.held + text
        if self.calling:
            self.held = held
            return ""
        if not self.sent:
            start = starts_call(held)
            if start is None or start:
                self.calling, self.held = bool(start), held
                return ""
        found = [i for i in (held.find(m) for m in _MARKERS) if i >= 0]
        if found:
            cut = min(found)
            self.calling, self.held = True, held[cut:]
            return self._send(held[:cut])
        keep = max((n for m in _MARKERS for n in range(1, len(m)) if held.endswith(m[:n])), default=0)
        self.held = held[len(held) - keep:] if keep else ""
        return self._send(held[: len(held) - keep])

    def _send(self, text: str) -> str:
        self.sent = self.sent or bool(text.strip())
        return text

    def finish(self, fmt: str, names: set[str]) -> tuple[str, list[ToolCall]]:
        """The content still to send, and the calls the answer made."""
        held, self.held = self.held, ""
        if not self.calling:
            return held, []
        return parse(held, fmt, names)


def pieces(arguments: str, size: int = 24) -> list[str]:
    """A call's arguments in the pieces a stream sends them in (clients join them)."""
    return [arguments[i : i + size] for i in range(0, len(arguments), size)] or [""]
