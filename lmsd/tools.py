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
tokens such as `[TOOL_CALLS]` from the text), and so are the slips real models make in place of their format:
several calls one after another, doubled braces, a wrapper tag (`_WRAPPERS`). A call counts only when it names one
of the request's functions and its arguments are a JSON object; anything else stays text. `parse` never raises:
malformed output is content.
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from collections.abc import Collection, Mapping
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


PROBE = {"type": "function", "function": {"name": "lms_probe_7f3a9c", "description": "probe",
                                          "parameters": {"type": "object", "properties": {}}}}


def renders_tools(render: Any) -> bool:
    """Whether a chat template shows the tools it is given: `render(messages, tools)` (the model's formatter) with a
    probe function, whose name must appear in the prompt — as llama.cpp tells a template's capabilities. (A template
    may mention `tools` and still never show them: Phi-4-mini reads tools from a message, not from `tools`.)"""
    try:
        prompt = render([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], [PROBE])
    except Exception:  # noqa: BLE001 - a template that fails on the probe does not take tools
        return False
    return str(PROBE["function"]["name"]) in prompt  # type: ignore[index]


def for_template(template: str | None, messages: list[dict[str, Any]], tools: list[dict[str, Any]], *,
                 shows_tools: bool, system_role: bool = True,
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and tools to render. A template that shows tools gets them as they are (Mistral's: with the
    9-character call ids its template insists on). One that does not gets no tools but GENERIC_PREAMBLE (when
    there are tools), the calls in the history written as the JSON the preamble asks for, and tool results as user
    messages where it knows no `tool` role. `system_role=False` (a template that refuses a system message, or
    turns that do not alternate: Gemma) puts the preamble in the first user message and joins consecutive
    messages of one role."""
    if family(template) == "mistral":
        messages = [_short_ids(m) for m in messages]
    if shows_tools:
        return messages, tools or None
    knows_tool_role = "tool" in (template or "")
    called: dict[Any, str] = {}  # call id -> function, of the calls so far (an id may come again later)
    out: list[dict[str, Any]] = []
    for m in messages:
        called.update((c.get("id"), c["function"]["name"]) for c in m.get("tool_calls") or [])
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
            text = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
            out.append({"role": "assistant", "content": (m.get("content") or "") + text})
        elif m.get("role") == "tool" and (not knows_tool_role or not system_role):
            name = m.get("name") or called.get(m.get("tool_call_id")) or "the function"  # OpenAI's carry only the id
            out.append({"role": "user", "content": f"Result of {name}: {m.get('content', '')}"})
        else:
            out.append({k: v for k, v in m.items() if k in ("role", "content")})
    if tools:
        preamble = GENERIC_PREAMBLE.format(tools="\n".join(json.dumps(t.get("function", t), ensure_ascii=False)
                                                           for t in tools))
        if out and out[0].get("role") == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{preamble}".strip()}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    if not system_role:
        out = _alternating(out)
    return out, None


def _alternating(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """No system message (its text opens the first user message) and no two messages of one role in a row."""
    out: list[dict[str, Any]] = []
    system = "\n\n".join(str(m.get("content") or "") for m in messages if m.get("role") == "system")
    for m in messages:
        if m.get("role") == "system":
            continue
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{m.get('content') or ''}"}
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    if system:
        if out and out[0]["role"] == "user":
            out[0] = {**out[0], "content": f"{system}\n\n{out[0]['content']}"}
        else:
            out.insert(0, {"role": "user", "content": system})
    return out


def _short_ids(message: dict[str, Any]) -> dict[str, Any]:
    """Mistral's templates refuse call ids that are not 9 letters or digits: a stable 9-character one instead."""
    def short(value: object) -> str:
        import hashlib

        return hashlib.sha1(str(value).encode()).hexdigest()[:9]

    out = dict(message)
    if message.get("tool_calls"):
        out["tool_calls"] = [{**c, "id": short(c.get("id"))} for c in message["tool_calls"]]
    if message.get("role") == "tool":
        out["tool_call_id"] = short(message.get("tool_call_id"))
    return out


# ---------------------------------------------------------------- forcing a call


def call_schema(functions: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of an answer that is a call of one of `functions` (OpenAI `function` objects): for llama.cpp's
    grammar, so that even a small model answers with a call that parses and validates. With `parallel`, a list of
    one to eight calls. Each function's parameters move under `$defs`, their own references (`#/$defs/...`, `#`)
    rebased there, so schemas that pydantic and the agent SDKs generate work."""
    defs: dict[str, Any] = {}
    one = []
    for n, f in enumerate(functions):
        defs[f"args{n}"] = _rebased(f.get("parameters") or {"type": "object"}, f"#/$defs/args{n}")
        one.append({"type": "object",
                    "properties": {"name": {"const": f["name"]}, "arguments": {"$ref": f"#/$defs/args{n}"}},
                    "required": ["name", "arguments"], "additionalProperties": False})
    call = one[0] if len(one) == 1 else {"anyOf": one}
    schema = {"type": "array", "items": call, "minItems": 1, "maxItems": 8} if parallel else dict(call)
    schema["$defs"] = defs
    return schema


def _rebased(schema: Any, base: str) -> Any:
    """`schema` with every local reference (`#...`, relative to its own root) pointing below `base` instead."""
    if isinstance(schema, dict):
        return {k: (base + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else _rebased(v, base))
                for k, v in schema.items()}
    if isinstance(schema, list):
        return [_rebased(v, base) for v in schema]
    return schema


# ---------------------------------------------------------------- reading the output


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)
    id: str = ""
    complete: bool = True  # False: cut short by max_tokens while it was streamed

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"call_{uuid.uuid4().hex[:24]}"

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN and Infinity: a client could not read the arguments back


_DECODER = json.JSONDecoder(parse_constant=_no_constant)
_MISTRAL_NAMED = re.compile(r"\[TOOL_CALLS\]\s*([A-Za-z0-9_.\-]+)\s*\[ARGS\]\s*")


def parse(text: str, fmt: str, names: Collection[str]) -> tuple[str, list[ToolCall]]:
    """(content, calls) from a model's answer. Calls are read only when every one of them is well formed and names a
    function in `names` (a mapping of names to their parameters' schemas types the arguments of calls written as
    XML); otherwise the whole answer is content and the log says why."""
    schemas = names if isinstance(names, Mapping) else {}
    try:
        content, calls = _parse(text, fmt, schemas)
    except (_NotACall, RecursionError) as exc:  # RecursionError: JSON nested past what the decoder follows
        log.info("the model's answer is text, not a tool call: %s", exc or "nested too deeply")
        return text, []
    except Exception:  # a reading of the model's output that breaks is a bug, never the client's 500
        log.exception("reading the model's answer for tool calls failed: answered as text")
        return text, []
    if not calls:
        return text, []
    unknown = [c.name for c in calls if c.name not in names]
    if unknown:
        log.info("the model called %s, which the request does not offer: answered as text", ", ".join(unknown))
        return text, []
    return content, calls


# Tags some models wrap a call in although their template asks for another form — Qwen2.5-Coder writes
# `<function>{...}</function>`, `<function-call>{...}` or `<tools>{...}</tool` (as its users have reported from
# real runs): read as a call when the answer opens with one.
_WRAPPERS = ("<function>", "<function-call>", "<function_call>", "<tools>")
_OPENINGS = ("```", *_WRAPPERS)


def starts_call(text: str) -> bool | None:
    """Whether an answer beginning with `text` is read as a plain-JSON call: True (JSON, a ``` fence or a wrapper
    tag), False, or None while it cannot tell yet (blank, or the start of a fence or a wrapper: "`", "<func")."""
    head = text.lstrip()
    if head == "" or any(o.startswith(head) and len(head) < len(o) for o in _OPENINGS):
        return None
    return head[0] in "[{" or head.startswith(_OPENINGS)


class _NotACall(ValueError):
    pass


def _hermes(text: str) -> tuple[str, list[tuple[str, bool]]]:
    """The text outside `<tool_call>...</tool_call>` and the bodies inside, each with whether it was closed (the
    last one may not be: cut short by max_tokens). Found with `find`, never a backtracking regex: an answer of
    whitespace costs linear time."""
    outside: list[str] = []
    bodies: list[tuple[str, bool]] = []
    pos = 0
    while (start := text.find("<tool_call>", pos)) >= 0:
        outside.append(text[pos:start])
        end = text.find("</tool_call>", start)
        stop = len(text) if end < 0 else end
        bodies.append((text[start + len("<tool_call>") : stop], end >= 0))
        pos = len(text) if end < 0 else end + len("</tool_call>")
    outside.append(text[pos:])
    return "".join(outside), bodies


def _unfenced(body: str) -> str:
    """A ```json fenced answer without the fence, and one in a wrapper tag (`_WRAPPERS`) without the tag and
    whatever there is of its closing tag."""
    if len(body) >= 6 and body.startswith("```") and body.endswith("```"):
        inner = body[3:-3]
        return (inner[4:] if inner.startswith("json") else inner).strip()
    for tag in _WRAPPERS:
        if body.startswith(tag):
            inner = body[len(tag):]
            last = max(inner.rfind("}"), inner.rfind("]"))
            tail = inner[last + 1 :].strip()
            closing = tail == "" or (tail.startswith("</") and len(tail) <= 20 and " " not in tail)
            return (inner[: last + 1] if closing else inner).strip()
    return body


def _parse(text: str, fmt: str, schemas: Mapping[str, Any]) -> tuple[str, list[ToolCall]]:
    if fmt == "hermes" and "<tool_call>" in text:
        outside, bodies = _hermes(text)
        return outside.strip(), [c for body, closed in bodies for c in _xml_call(body, closed, schemas)
                                 or _calls_in(body)]
    if fmt == "mistral" and "[TOOL_CALLS]" in text:
        before, _, after = text.partition("[TOOL_CALLS]")
        if _MISTRAL_NAMED.match("[TOOL_CALLS]" + after):
            return before.strip(), _mistral_named("[TOOL_CALLS]" + after)
        return before.strip(), _calls_in(after)
    if fmt == "llama3" and "<|python_tag|>" in text:
        before, _, after = text.partition("<|python_tag|>")
        return before.strip(), _calls_in(after)
    body = _unfenced(text.strip())
    if not body or body[0] not in "[{":
        return text, []
    return "", _calls_in(body)


def _xml_call(body: str, closed: bool, schemas: Mapping[str, Any]) -> list[ToolCall]:
    """Calls written as XML inside <tool_call> — Qwen3-Coder's `<function=NAME><parameter=KEY>VALUE</parameter>
    ...</function>` (several functions in one body are several calls), GLM-4.5's `NAME<arg_key>KEY</arg_key>
    <arg_value>VALUE</arg_value>...` (whose end is only known from </tool_call>: `closed`) — or [] when the body is
    not one. Nothing but white space may come between the tags; a value is text, or the JSON it spells where the
    function's schema does not make it a string. Read by position, each character once."""
    body = body.strip()
    if body.startswith("<function="):
        calls, pos = [], 0
        while pos < len(body):
            if not body.startswith("<function=", pos):
                raise _NotACall("text between the functions of a call")
            name_end = body.find(">", pos)
            end = body.find("</function>", pos)
            if name_end < 0 or end < 0:
                raise _NotACall("a function call cut short")
            name = body[pos + len("<function=") : name_end].strip()
            inside = body[name_end + 1 : end]
            if "<parameter=" in inside:
                args = _pairs(inside, "<parameter=", ">", "</parameter>", name, schemas)
            else:  # JSON inside the tags (Llama 3.1's <function=NAME>{...}</function>), or nothing
                args = _json_object(inside, name) if inside.strip() else {}
            calls.append(_call(name, args))
            pos = _skip_space(body, end + len("</function>"))
        return calls
    if "<arg_key>" in body and not body.startswith(("{", "[")):
        if not closed:
            raise _NotACall("a call cut short (no </tool_call>)")
        name, _, rest = body.partition("<arg_key>")
        if not name.strip() or any(c in name for c in "<>{}"):
            return []
        return [_call(name.strip(), _pairs("<arg_key>" + rest, "<arg_key>", "</arg_key>", "</arg_value>",
                                           name.strip(), schemas, value_open="<arg_value>"))]
    return []


def _pairs(text: str, key_open: str, key_close: str, value_close: str, name: str, schemas: Mapping[str, Any],
           value_open: str = "") -> dict[str, Any]:
    """The keys and values of an XML call, nothing but white space around them."""
    schema = schemas.get(name)
    props = schema.get("properties") if isinstance(schema, dict) else None
    props = props if isinstance(props, dict) else {}
    args: dict[str, Any] = {}
    pos = _skip_space(text, 0)
    while pos < len(text):
        if not text.startswith(key_open, pos):
            raise _NotACall(f"text between the parameters of {name}")
        key_end = text.find(key_close, pos)
        if key_end < 0:
            raise _NotACall(f"a parameter of {name} is cut short")
        key = text[pos + len(key_open) : key_end].strip()
        start = _skip_space(text, key_end + len(key_close)) if value_open else key_end + len(key_close)
        if value_open:
            if not text.startswith(value_open, start):
                raise _NotACall(f"the parameter {key} of {name} has no value")
            start += len(value_open)
        end = text.find(value_close, start)
        if end < 0:
            raise _NotACall(f"a parameter of {name} is cut short")
        args[key] = _typed(text[start:end].strip("\n"), props.get(key))
        pos = _skip_space(text, end + len(value_close))
    return args


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_object(text: str, name: str) -> Any:
    try:
        return _DECODER.decode(text.strip())
    except ValueError:
        raise _NotACall(f"the arguments of {name} are not JSON") from None


def _is_text(schema: Any) -> bool:
    """Whether a parameter's schema makes its value a string: `type` string (or among its types), or every branch
    of anyOf / oneOf, an enum or a const being strings."""
    if not isinstance(schema, dict):
        return False
    kind = schema.get("type")
    if kind == "string" or (isinstance(kind, list) and "string" in kind):
        return True
    if isinstance(schema.get("enum"), list) and schema["enum"] and all(isinstance(v, str) for v in schema["enum"]):
        return True
    if isinstance(schema.get("const"), str):
        return True
    branches = schema.get("anyOf") or schema.get("oneOf")
    return isinstance(branches, list) and any(_is_text(b) for b in branches)


def _typed(value: str, schema: Any) -> Any:
    """A parameter written as text: itself where the schema makes it a string, else the JSON it spells (if it
    does)."""
    if _is_text(schema):
        return value
    try:
        decoded = _DECODER.decode(value)
    except ValueError:  # not JSON (NaN and Infinity included): the text itself
        return value
    return value if isinstance(decoded, float) and not math.isfinite(decoded) else decoded  # 1e999


def _calls_in(text: str) -> list[ToolCall]:
    """The calls in `text`: JSON values one after the other, separated by white space or `;` (Llama 3's several
    calls; one object per line, as Qwen2.5-Coder writes several), each a call or a list of calls. A call written
    in doubled braces, `{{"name": ...}}` (Qwen 2.5, misled by its template's escaping), is read as one."""
    calls: list[ToolCall] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t\r\n;":
            i += 1
        if i == n:
            break
        try:
            value, i = _DECODER.raw_decode(text, i)
        except ValueError as exc:
            value, i = _doubled(text, i, exc)
        calls += _calls(value)
    if not calls:
        raise _NotACall("no JSON")
    return calls


def _doubled(text: str, at: int, exc: ValueError) -> tuple[Any, int]:
    """`{{...}}` at `at`: the object inside, and where the outer braces end."""
    if text.startswith("{{", at):
        try:
            value, end = _DECODER.raw_decode(text, at + 1)
        except ValueError:
            pass
        else:
            while end < len(text) and text[end] in " \t\r\n":
                end += 1
            if text.startswith("}", end):
                return value, end + 1
    raise _NotACall(f"not JSON: {exc}") from None


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
            if "arguments" not in item:
                raise _NotACall("a function's definition (as the request gave it), not a call")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise _NotACall("a call without a name")
        if "arguments" not in item and "parameters" not in item:  # {"name": ...} alone is an answer, not a call
            raise _NotACall(f"{name} is called without arguments")
        if "arguments" not in item and _defines(item):  # a model repeating the tools its prompt lists
            raise _NotACall(f"the definition of {name} (as the prompt lists it), not a call")
        args = item["arguments"] if "arguments" in item else item["parameters"]
        calls.append(_call(name, args))
    return calls


def _defines(item: dict[str, Any]) -> bool:
    """Whether `{"name", "parameters", ...}` is a function's definition rather than Llama 3's call: it describes
    the function, or its parameters are a schema of an object."""
    params = item.get("parameters")
    return "description" in item or (isinstance(params, dict) and params.get("type") == "object"
                                     and isinstance(params.get("properties"), dict))


def _call(name: str, args: Any) -> ToolCall:
    if isinstance(args, str):  # arguments given as JSON text
        try:
            args = _DECODER.decode(args) if args.strip() else {}
        except ValueError:
            raise _NotACall(f"the arguments of {name} are not JSON") from None
    if not isinstance(args, dict):
        raise _NotACall(f"the arguments of {name} are not an object")
    try:
        return ToolCall(name, json.dumps(args, ensure_ascii=False, allow_nan=False))
    except ValueError:  # a number too big for a float (1e999) became infinity
        raise _NotACall(f"the arguments of {name} hold a number JSON cannot carry") from None


# ---------------------------------------------------------------- streaming

_MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")  # every format's: the stream starts before `done` says


class ToolStream:
    """A streamed answer that may turn into tool calls. Text goes on to the client as content until a call may have
    begun — a format's tag, or JSON (or a ```json fence) as the answer's first character — and from there it is held
    and read at the end (`finish`). A held answer that is no call after all is sent as content then: nothing is
    lost, it only comes later."""

    def __init__(self) -> None:
        self.held = ""  # short: a blank start, or what may be the start of a marker, a fence or a wrapper
        self._blank: list[str] = []  # the answer so far, while it is only white space
        self._rest: list[str] = []  # everything after `held`, once a call may have begun
        self.calling = False  # a call may have begun: everything from there is held
        self.sent = False  # content other than whitespace went out

    def feed(self, text: str) -> str:
        """The content to send now. Each piece is looked at once (pieces are appended to lists, never to a growing
        string), so a long answer — or a long run of white space — costs linear time."""
        if self.calling:
            self._rest.append(text)
            return ""
        if not self.sent and not self.held and not text.strip():
            self._blank.append(text)
            return ""
        held = "".join(self._blank) + self.held + text if self._blank else self.held + text
        self._blank.clear()
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

    def finish(self, fmt: str, names: Collection[str]) -> tuple[str, list[ToolCall]]:
        """The content still to send, and the calls the answer made."""
        held = "".join(self._blank) + self.held + "".join(self._rest)
        self.held, self._blank, self._rest = "", [], []
        if not self.calling:
            return held, []
        return parse(held, fmt, names)


@dataclass
class CallPart:
    """A piece of a streamed call: the first (`first`: its id and name are known) and the last (`last`: its arguments
    are complete, or cut short by max_tokens when `call.complete` is False) may carry no `delta`; the pieces of
    arguments in between join to `call.arguments`."""

    index: int  # the call's place in the answer
    call: ToolCall
    delta: str = ""
    first: bool = False
    last: bool = False


def parts(index: int, call: ToolCall, size: int = 24) -> list[CallPart]:
    """A call read whole, as the parts a stream sends: its start, its arguments in pieces, its end."""
    pieces = [call.arguments[i : i + size] for i in range(0, len(call.arguments), size)]
    return [CallPart(index, call, first=True), *(CallPart(index, call, p) for p in pieces),
            CallPart(index, call, last=True)]


class ForcedStream:
    """The answer of a forced call (`call_schema`: `{"name": ..., "arguments": {...}}`, or a list of those), read as
    it is decoded: a call starts once its name is complete, and its arguments go out piece by piece as the model
    writes them, as OpenAI streams them. The grammar makes the text a call and stop sequences do not apply to it, so
    nothing has to be held back to be checked; only max_tokens can cut it short (the last part says so:
    `call.complete` is False; `cut` says the answer ended inside its JSON). Each character is looked at once,
    tracking strings and nesting: the calls are objects at `_depth` (1, or 2 inside a list)."""

    def __init__(self) -> None:
        self._head: list[str] | None = []  # the text until a call starts: the answer, should none start
        self._stack: list[str] = []
        self._in_string = self._escaped = False
        self._literal: list[str] | None = None  # a string at the calls' depth (a key, a name), being read
        self._depth = 0  # the nesting of a call object, known from the first bracket
        self._key: str | None = None  # the call's key whose value comes next
        self._expect_key = False
        self._call: ToolCall | None = None  # the call being read, once its name is known
        self._args: list[str] | None = None  # its arguments so far, while they are being written
        self._unsent: list[str] = []  # ... the part of them not sent yet
        self._args_done = False  # its arguments are complete ...
        self._closed = ""  # ... and these
        self.count = 0  # calls started
        self.cut = False  # the answer ended inside its JSON (set by `finish`)

    def feed(self, text: str) -> list[CallPart]:
        if self._head is not None:
            self._head.append(text)
        out: list[CallPart] = []
        args_from = 0 if self._args is not None else -1  # where this piece's part of the arguments begins
        for i, c in enumerate(text):
            if self._in_string:
                if self._literal is not None:
                    self._literal.append(c)
                if self._escaped:
                    self._escaped = False
                elif c == "\\":
                    self._escaped = True
                elif c == '"':
                    self._in_string = False
                    if self._literal is not None:
                        literal, self._literal = "".join(self._literal), None
                        out += self._string(literal)
                continue
            if c == '"':
                self._in_string = True
                self._literal = ['"'] if len(self._stack) == self._depth else None
            elif c in "{[":
                if not self._stack:
                    self._depth = 2 if c == "[" else 1
                self._stack.append(c)
                if len(self._stack) == self._depth and c == "{":  # a call's object begins
                    self._key, self._expect_key, self._args_done = None, True, False
                elif (len(self._stack) == self._depth + 1 and self._key == "arguments" and self._args is None
                      and not self._args_done):
                    self._args, args_from = [], i
            elif c in "}]" and self._stack:
                self._stack.pop()
                if len(self._stack) == self._depth and self._args is not None:
                    out += self._more(text[args_from : i + 1], closing=True)
                    args_from = -1
                elif len(self._stack) == self._depth - 1 and self._call is not None:
                    out += self._end(complete=False)  # a call object without arguments that are an object
            elif len(self._stack) == self._depth:
                if c == ":":
                    self._expect_key = False
                elif c == ",":
                    self._expect_key, self._key = True, None
        if self._args is not None and 0 <= args_from < len(text):
            out += self._more(text[args_from:])
        return out

    def finish(self) -> tuple[str, list[CallPart]]:
        """The text when no call began (only max_tokens stops a forced answer before its first name), or the end of a
        call cut short."""
        if self.count == 0:
            return "".join(self._head or []), []
        self.cut = bool(self._stack) or self._in_string
        return "", self._end(complete=False) if self._call is not None else []

    def _string(self, literal: str) -> list[CallPart]:
        try:
            value = json.loads(literal)
        except ValueError:
            return []
        if self._expect_key:
            self._key = value if isinstance(value, str) else None
            return []
        if self._key != "name" or self._call is not None or not isinstance(value, str):
            return []
        self._call, self._head = ToolCall(value, ""), None
        self.count += 1
        out = [CallPart(self.count - 1, self._call, first=True)]
        if self._args_done:  # arguments written before the name (not in the grammar's order)
            return out + self._end(complete=True)
        return out + self._more("")

    def _more(self, piece: str, closing: bool = False) -> list[CallPart]:
        """More of the arguments: sent as a part once the call has a name; with `closing`, their end."""
        args = self._args if self._args is not None else []
        if piece:
            args.append(piece)
            self._unsent.append(piece)
        if closing:
            self._args, self._args_done, self._closed = None, True, "".join(args)
        if self._call is None:
            return []
        delta, self._unsent = "".join(self._unsent), []
        out = [CallPart(self.count - 1, self._call, delta)] if delta else []
        return out + self._end(complete=True) if closing else out

    def _end(self, complete: bool) -> list[CallPart]:
        """The last part of the call being read: its arguments whole (or what was written of them)."""
        call, self._call = self._call, None
        assert call is not None
        out = []
        if self._unsent:
            out.append(CallPart(self.count - 1, call, "".join(self._unsent)))
            self._unsent = []
        if self._args_done:
            call.arguments = self._closed
        else:
            call.arguments = "".join(self._args or [])
        self._args = None
        call.complete = complete and self._args_done
        return [*out, CallPart(self.count - 1, call, last=True)]
