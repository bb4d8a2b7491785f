"""Tool calling's pure parts (lmsd/tools.py): the format a chat template implies, reading answers of the model
families into calls (malformed ones included), the stream that holds back a call, the prompt for templates without
tool support, the schema that forces a call; and the Responses API's bounded store of conversations."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmsd import tools

NAMES = {"get_weather", "search"}

# Chat-template fragments as the GGUFs carry them (trimmed to the part that identifies the format).
QWEN25 = ('{%- if tools %}{{- "# Tools\\n\\nYou may call one or more functions" }}{%- for tool in tools %}'
          '{{- tool | tojson }}{%- endfor %}{{- "<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
          '<args-json-object>}\\n</tool_call>" }}{%- endif %}')
LLAMA31 = ('{%- if tools is not none %}{{- "<|start_header_id|>ipython<|end_header_id|>" }}{%- endif %}'
           '{{- "<|python_tag|>" + tool_call.name }}')
MISTRAL = '{%- if tools %}[AVAILABLE_TOOLS]{{ tools|tojson }}[/AVAILABLE_TOOLS]{%- endif %}[TOOL_CALLS]'
CHATML = "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"


@pytest.mark.parametrize(("template", "fmt"), [(QWEN25, "hermes"), (LLAMA31, "llama3"), (MISTRAL, "mistral"),
                                                (CHATML, "generic"), (None, "generic")])
def test_the_format_comes_from_the_template(template: str | None, fmt: str) -> None:
    assert tools.family(template) == fmt


# Answers in the shapes these families write, as their chat templates and model cards specify them (Qwen 2.5 and
# Hermes 3: <tool_call>; Llama 3.1-3.3: JSON with "parameters", <|python_tag|>; Mistral v0.3 and the newer
# [TOOL_CALLS]name[ARGS]), with the variations llama.cpp's text has (a control token left out, a call cut short).
RECORDED = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     "", [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    ("hermes", 'I will look that up.\n<tool_call>\n{"name": "search", "arguments": {"q": "lms"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
     "I will look that up.", [("search", {"q": "lms"}), ("get_weather", {"city": "Oslo"})]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}',  # cut at max_tokens: no close
     "", [("get_weather", {"city": "Paris"})]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", {"city": "Paris"})]),
    ("llama3", '<|python_tag|>{"name": "search", "parameters": {"q": "x"}}', "", [("search", {"q": "x"})]),
    ("llama3", '{"name": "search", "parameters": {"q": "a"}}; {"name": "search", "parameters": {"q": "b"}}', "",
     [("search", {"q": "a"}), ("search", {"q": "b"})]),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', "",
     [("get_weather", {"city": "Paris"})]),
    ("mistral", '[{"name": "get_weather", "arguments": {"city": "Paris"}}]', "",  # control token not in the text
     [("get_weather", {"city": "Paris"})]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]search[ARGS]{"q": "x"}', "",
     [("get_weather", {"city": "Paris"}), ("search", {"q": "x"})]),
    ("generic", '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```', "",
     [("get_weather", {"city": "Paris"})]),
    ("generic", '{"tool_calls": [{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}]}', "",
     [("search", {"q": "x"})]),
    ("hermes", '{"name": "get_weather", "arguments": {"city": "Paris"}}', "",  # a grammar-forced call: plain JSON
     [("get_weather", {"city": "Paris"})]),
    # What real models wrote in place of their template's format, as their users reported it from real runs (the
    # functions are ours; the shapes are theirs).
    ("hermes", '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```', "",  # Qwen2.5-Coder 14B,
     [("get_weather", {"city": "Paris"})]),  # at long prompts (ardanlabs/kronk#950)
    ("hermes", '<function>\n{"name": "search", "arguments": {"q": "x"}}\n</function>', "",  # Qwen2.5-Coder 7B
     [("search", {"q": "x"})]),  # (ardanlabs/kronk#944), and its 14B's other two wrappers:
    ("hermes", '<tools> {"name": "search", "arguments": {"q": "x"}} </tool', "", [("search", {"q": "x"})]),
    ("hermes", '<function-call> {"name": "search", "arguments": {"q": "x"}}', "", [("search", {"q": "x"})]),
    ("hermes", '{\n"name": "search",\n"arguments": {\n"q": "a"\n}\n}\n{"name": "get_weather", "arguments": {}}',
     "", [("search", {"q": "a"}), ("get_weather", {})]),  # two calls, one object after the other (opilot#149)
    ("hermes", '<tool_call>\n{{"name": "search", "arguments": {"q": "1.2.3.4"}}}\n</tool_call>', "",  # Qwen2.5-72B
     [("search", {"q": "1.2.3.4"})]),  # doubles the braces (QwenLM/Qwen3#924)
    ("llama3", '```json\n{"name": "search", "parameters": {"q": "install models"}}\n```', "",  # Llama 3.2 3B
     [("search", {"q": "install models"})]),  # (ollama/ollama#13519)
]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), RECORDED)
def test_recorded_answers_become_calls(fmt: str, text: str, content: str, calls: list[tuple[str, dict]]) -> None:
    got_content, got = tools.parse(text, fmt, NAMES)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert len({c.id for c in got}) == len(got) and all(c.id.startswith("call_") for c in got)


MALFORMED = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),  # cut inside the JSON
    ("hermes", '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'),  # a function not offered
    ("hermes", '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>'),  # no name
    ("hermes", '<tool_call>\n{"name": "search", "arguments": [1, 2]}\n</tool_call>'),  # arguments not an object
    ("llama3", '{"name": "search", "parameters": {"q": "a"}} and then some words'),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": '),
    ("generic", '{"answer": 42}'),  # JSON, but no call
    ("generic", "The weather in Paris is sunny."),
    ("generic", "[]"),
    ("hermes", "<function>get_weather is what I would call</function>"),
    ("hermes", '<tool_call>\n{{"name": "search", "arguments": {}}\n</tool_call>'),  # doubled on one side only
    ("generic", '<tools>{"name": "search", "arguments": {}}</tools> and then some words'),
]


@pytest.mark.parametrize(("fmt", "text"), MALFORMED)
def test_malformed_answers_stay_text(fmt: str, text: str) -> None:
    assert tools.parse(text, fmt, NAMES) == (text, [])


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(tools.FAMILIES),
       st.lists(st.sampled_from(list('{}[]":,; \n<>|_abc') + [
           "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", '"name"', '"arguments"',
           '"parameters"', '"search"', "```json", "```", '{"name": "search", "arguments": {}}',
           "<function=", "search>", "<parameter=", "q>", "</parameter>", "</function>", "<arg_key>", "</arg_key>",
           "<arg_value>", "</arg_value>", "<function>", "<tools>", "{{", "}}"]),
           max_size=30).map("".join))
def test_parsing_never_raises_and_calls_are_well_formed(fmt: str, text: str) -> None:
    content, calls = tools.parse(text, fmt, NAMES)
    assert isinstance(content, str)
    for call in calls:
        assert call.name in NAMES and isinstance(json.loads(call.arguments), dict)
    if not calls:
        assert content == text  # nothing lost


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([text for _fmt, text, _c, _calls in RECORDED] + [text for _fmt, text in MALFORMED] +
                       ["Hello there, ``not code`` here", "`", "  {", "plain <tool", "a [TOOL_CALLS"]),
       st.lists(st.integers(min_value=1, max_value=7), max_size=30), st.sampled_from(tools.FAMILIES))
def test_a_stream_gives_the_same_answer_however_the_text_is_split(text: str, cuts: list[int], fmt: str) -> None:
    """What a streamed client gets — the content sent on the way, the rest and the calls at the end — is what the
    whole answer parses to, in any split into tokens."""
    stream, sent, i = tools.ToolStream(), "", 0
    for n in cuts:
        sent += stream.feed(text[i : i + n])
        i += n
    sent += stream.feed(text[i:])
    rest, calls = stream.finish(fmt, NAMES)
    whole_content, whole_calls = tools.parse(text, fmt, NAMES)
    if calls or whole_calls:
        assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
        assert (sent + " " + rest).split() == whole_content.split()  # the same words, spacing aside
    else:
        assert sent + rest == text


def test_a_stream_sends_plain_text_as_it_comes() -> None:
    stream = tools.ToolStream()
    assert stream.feed("The weather ") == "The weather "
    assert stream.feed("is fine <tool") == "is fine "  # the start of a tag is held
    assert stream.feed("bar>") == "<toolbar>"  # ... until it is not one
    html = tools.ToolStream()
    assert html.feed("<") == "" and html.feed("d") == "<d"  # not the start of a wrapper (<function>, <tools>)
    wrapped = tools.ToolStream()
    assert wrapped.feed("<func") == "" and wrapped.feed("tion>{") == ""  # a wrapped call is held


FN = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": "", "tool_calls": [
               {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
           {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"}]


def test_a_template_without_tools_gets_the_preamble_and_the_history_as_json() -> None:
    out, passed = tools.for_template("{{ messages }}", HISTORY, [FN], shows_tools=False)
    assert passed is None
    assert out[0]["role"] == "system" and '"name": "get_weather"' in out[0]["content"]
    assert json.loads(out[2]["content"]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert out[3] == {"role": "user", "content": "Result of get_weather: sunny"}
    assert tools.for_template(QWEN25, HISTORY, [FN], shows_tools=True) == (HISTORY, [FN])
    # Calls in the history are written out even when the request offers no tools (tool_choice "none").
    quiet, _ = tools.for_template("{{ messages }}", HISTORY, [], shows_tools=False)
    assert [m["role"] for m in quiet] == ["user", "assistant", "user"] and "get_weather" in quiet[1]["content"]


def test_a_template_that_refuses_a_system_role_gets_the_preamble_in_the_first_user_turn() -> None:
    """Gemma's templates raise on a system message and on turns that do not alternate."""
    history = [*HISTORY, {"role": "tool", "tool_call_id": "call_2", "content": "windy"}]
    out, _ = tools.for_template("{{ messages }}", history, [FN], shows_tools=False, system_role=False)
    assert [m["role"] for m in out] == ["user", "assistant", "user"]
    assert out[0]["content"].startswith("You can call these functions") and out[0]["content"].endswith("Paris?")
    assert "sunny" in out[2]["content"] and "windy" in out[2]["content"]


def test_mistral_templates_get_nine_character_call_ids() -> None:
    out, _ = tools.for_template(MISTRAL, HISTORY, [FN], shows_tools=True)
    call_id = out[1]["tool_calls"][0]["id"]
    assert len(call_id) == 9 and call_id.isalnum() and out[2]["tool_call_id"] == call_id


def test_whether_a_template_shows_tools_is_seen_in_what_it_renders() -> None:
    import jinja2

    def render_with(template: str):  # type: ignore[no-untyped-def]
        return lambda messages, tools_: jinja2.Template(template).render(messages=messages, tools=tools_)

    assert tools.renders_tools(render_with("{% for t in tools %}{{ t | tojson }}{% endfor %}"))
    # Phi-4-mini mentions `tools` but reads them from a message: the probe's name never shows.
    assert not tools.renders_tools(render_with("{% for m in messages %}{{ m['tools'] }}{{ m.content }}{% endfor %}"))
    assert not tools.renders_tools(render_with("{{ raise_exception('no') }}"))


def test_the_forcing_schema_allows_exactly_a_call_of_an_offered_function() -> None:
    fns = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                  "required": ["city"]}}, {"name": "search"}]
    one = tools.call_schema(fns[:1], parallel=False)
    assert one["properties"]["name"] == {"const": "get_weather"} and one["required"] == ["name", "arguments"]
    assert [s["properties"]["name"]["const"] for s in tools.call_schema(fns, parallel=False)["anyOf"]] == \
        ["get_weather", "search"]
    many = tools.call_schema(fns, parallel=True)
    assert many["type"] == "array" and many["minItems"] == 1


def test_the_responses_store_is_bounded_in_count_age_and_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmsd.http import responses

    now = [0.0]
    store = responses.Store(clock=lambda: now[0])
    monkeypatch.setattr(responses, "KEEP_COUNT", 3)
    for n in range(5):
        store.put(f"r{n}", [{"role": "user", "content": str(n)}])
    assert [store.get(f"r{n}") is not None for n in range(5)] == [False, False, True, True, True]
    assert store.get("r4") == [{"role": "user", "content": "4"}]
    now[0] = responses.KEEP_SECONDS + 1  # an hour later every one has expired
    assert store.get("r4") is None
    monkeypatch.setattr(responses, "KEEP_BYTES", 100)
    store.put("big", [{"role": "user", "content": "x" * 200}])  # larger than the whole store: not kept
    store.put("a", [{"role": "user", "content": "y" * 40}])
    store.put("b", [{"role": "user", "content": "z" * 40}])  # together over 100 bytes: the oldest goes
    assert store.get("big") is None and store.get("a") is None and store.get("b") is not None


def test_a_forced_call_keeps_the_parameters_references_working() -> None:
    """Schemas from pydantic and the agent SDKs use `$defs` and `$ref`: they still resolve once the parameters sit
    inside the call's schema (llama.cpp's converter builds the grammar)."""
    from llama_cpp.llama_grammar import LlamaGrammar

    params = {"type": "object", "properties": {"loc": {"$ref": "#/$defs/Loc"}}, "required": ["loc"],
              "$defs": {"Loc": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                "required": ["city"]}}}
    for parallel in (False, True):
        schema = tools.call_schema([{"name": "f", "parameters": params}, {"name": "g"}], parallel=parallel)
        grammar = LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False)
        assert "Paris" in grammar._grammar and "Oslo" in grammar._grammar


def test_forced_functions_are_bounded_together() -> None:
    """Each function's parameters may be up to 64 KB, but a forced call's grammar comes from all of them: the whole
    is bounded too, before any worker builds it."""
    from pydantic import ValidationError

    from lmsd.http.schemas import ChatRequest

    big = {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 200} for i in range(900)}}
    fn = [{"type": "function", "function": {"name": f"f{n}", "parameters": big}} for n in range(4)]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": fn}
    ChatRequest.model_validate(body)  # offered, not forced: fine
    with pytest.raises(ValidationError, match="larger than 64 KB"):
        ChatRequest.model_validate({**body, "tool_choice": "required"})


def _forced_text(calls: list[tuple[str, dict]], listed: bool, spacing: str) -> str:
    """A forced answer as the grammar lets a model write it (any spacing between the JSON's tokens)."""
    one = [f'{{{spacing}"name":{spacing}{json.dumps(n)},{spacing}"arguments":{spacing}'
           f'{json.dumps(a, indent=1 if spacing else None)}{spacing}}}' for n, a in calls]
    return f"[{spacing}{(','+spacing).join(one)}]" if listed else one[0]


ARGUMENTS = st.dictionaries(st.text(max_size=5), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='ab"\\{}[],: \n\u00e9', max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=8), max_size=4)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(NAMES)), ARGUMENTS), min_size=1, max_size=3), st.booleans(),
       st.sampled_from(["", " ", "\n  "]), st.lists(st.integers(min_value=1, max_value=9), max_size=40))
def test_a_forced_call_streams_its_arguments_as_they_are_decoded(
        calls: list[tuple[str, dict]], listed: bool, spacing: str, cuts: list[int]) -> None:
    """Whatever the split into tokens: each call starts once its name is complete, its arguments go out in pieces
    while they are written (a piece before the call's last character arrives), the pieces join to the arguments,
    and the calls are those the whole answer parses to."""
    calls = calls if listed else calls[:1]
    text = _forced_text(calls, listed, spacing)
    starts = [m.end() for m in re.finditer(r'"arguments":\s*', text)]  # where each call's arguments begin
    stream, parts, i = tools.ForcedStream(), [], 0
    for n in [*cuts, len(text)]:
        parts += stream.feed(text[i : i + n])
        i += n
        if parts and not parts[-1].last and starts[parts[-1].index] < i:
            # nothing of the arguments is held back: what was sent of them reaches the last character fed
            assert "".join(p.delta for p in parts if p.index == parts[-1].index) == text[starts[parts[-1].index]:i]
    rest, ends = stream.finish()
    assert rest == "" and ends == []
    ended = [p.call for p in parts if p.last]
    assert [(c.name, json.loads(c.arguments)) for c in ended] == calls
    assert [(c.name, json.loads(c.arguments)) for c in ended] == \
        [(c.name, json.loads(c.arguments)) for c in tools.parse(text, "generic", NAMES)[1]]
    for index, call in enumerate(ended):
        mine = [p for p in parts if p.index == index]
        assert mine[0].first and mine[-1].last and all(p.call is call for p in mine)
        assert "".join(p.delta for p in mine) == call.arguments and call.complete


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(NAMES)), ARGUMENTS), min_size=1, max_size=3), st.booleans(),
       st.data())
def test_a_forced_call_cut_by_max_tokens_says_so(calls: list[tuple[str, dict]], listed: bool,
                                                 data: st.DataObject) -> None:
    """Cut anywhere: before a name the text is the answer; after one, the last call ends incomplete, its arguments
    what was written of them."""
    text = _forced_text(calls if listed else calls[:1], listed, " ")
    cut = data.draw(st.integers(min_value=0, max_value=len(text) - 1))
    stream = tools.ForcedStream()
    parts = stream.feed(text[:cut])
    rest, ends = stream.finish()
    if not any(p.first for p in parts):
        assert rest == text[:cut] and ends == []
        return
    assert rest == ""
    last = (parts + ends)[-1]
    assert last.last and stream.cut  # the answer ended inside its JSON
    start = [m.end() for m in re.finditer(r'"arguments":\s*', text)][last.index]
    if last.call.complete:  # cut after the arguments, in what closes the call
        assert last.call.arguments == text[start : start + len(last.call.arguments)] and ends == []
        assert isinstance(json.loads(last.call.arguments), dict)
    else:  # what was written of the arguments, nothing when the cut came before them
        assert last.call.arguments == text[start:cut] if cut > start else last.call.arguments == ""
        assert ends == [last]
    assert all(p.call.complete for p in parts if p.last)  # only the call being written when the cut came is not


def test_a_forced_call_sends_its_arguments_before_it_is_finished() -> None:
    stream = tools.ForcedStream()
    assert [(p.first, p.call.name) for p in stream.feed('{"name": "get_weather", "argu')] == [(True, "get_weather")]
    assert [p.delta for p in stream.feed('ments": {"city": "Pa')] == ['{"city": "Pa']
    assert [p.delta for p in stream.feed('ris"')] == ['ris"']
    end = stream.feed("}}")
    assert [(p.delta, p.last) for p in end] == [("}", False), ("", True)]
    assert end[-1].call.arguments == '{"city": "Paris"}' and end[-1].call.complete


@pytest.mark.parametrize(("api", "body", "param"), [
    ("anthropic", {"tools": [{"name": "f", "input_schema": {"type": "string"}}]}, "tools.0.input_schema"),
    ("anthropic", {"tools": [{"name": "f f", "input_schema": {"type": "object"}}]}, "tools.0.name"),
    ("anthropic", {"tool_choice": {"type": "tool", "name": "g"}, "tools": [{"name": "f", "input_schema": {}}]},
     None),  # not a field's fault: the message says which function is missing
    ("anthropic", {"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t" * 300, "content": "21"}]}]}, "messages"),
    ("responses", {"tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]},
     "tools.0.parameters"),
    ("responses", {"text": {"format": {"type": "json_schema", "schema": {"type": "object", "maxLength": 10**9}}}},
     "text.format"),
])
def test_errors_on_the_agent_apis_name_the_field_their_client_sent(api: str, body: dict, param: str | None) -> None:
    """/v1/messages and /v1/responses are translated to a chat request: a field that fails there is named as the
    client's own API calls it (`input_schema`, not `tools.0.function.parameters`)."""
    from lmsd.http import anthropic, responses
    from lmsd.http.errors import HttpError

    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(HttpError) as refused:
        if api == "anthropic":
            anthropic.to_chat(anthropic.MessagesRequest.model_validate(
                {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]} | body))
        else:
            responses.to_chat(responses.ResponsesRequest.model_validate({"model": "m", "input": "hi", **body}), [])
    assert refused.value.status == 400
    if param is not None:
        assert refused.value.param is not None and refused.value.param.startswith(param), refused.value.message
        assert refused.value.message.startswith(param) and "function" not in refused.value.param


def test_a_forced_call_list_cut_between_calls_is_cut_and_odd_arguments_end_their_call() -> None:
    stream = tools.ForcedStream()
    parts = stream.feed('[{"name": "search", "arguments": {"q": "a"}}, {"na')
    assert [(p.call.name, p.last, p.call.complete) for p in parts if p.last] == [("search", True, True)]
    assert stream.finish() == ("", []) and stream.cut  # the first call is whole; the list is not
    # Arguments that are not an object (no schema we accept makes them so): the call ends incomplete, the next reads.
    odd = tools.ForcedStream()
    parts = odd.feed('[{"name": "search", "arguments": "x"}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]')
    ended = [(p.call.name, p.call.arguments, p.call.complete) for p in parts if p.last]
    assert ended == [("search", "", False), ("get_weather", '{"city": "Oslo"}', True)]
    assert odd.finish() == ("", []) and not odd.cut


def test_a_model_repeating_the_tools_from_its_prompt_makes_no_call() -> None:
    """Small models echo their prompt: the tools as the generic preamble lists them, or inside <tools> as Hermes
    templates print them, are definitions, not calls."""
    fns = [{"type": "function", "function": {"name": n, "description": "d", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}}}}} for n in sorted(NAMES)]
    preamble_lines = "\n".join(json.dumps(f["function"]) for f in fns)
    hermes_block = "<tools>\n" + "\n".join(json.dumps(f) for f in fns) + "\n</tools>"
    bare = '{"name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}'
    for fmt, text in [("generic", preamble_lines), ("hermes", hermes_block), ("generic", json.dumps(fns)),
                      ("llama3", bare)]:
        assert tools.parse(text, fmt, NAMES) == (text, []), text


def test_parsing_never_raises_on_json_nested_past_the_decoder() -> None:
    for text in ["[" * 5000, '{"a":' * 5000, "<tool_call>" + "[" * 5000, "{{" + "[" * 5000 + "]" * 5000 + "}}"]:
        for fmt in tools.FAMILIES:
            assert tools.parse(text, fmt, NAMES) == (text, [])


def test_a_result_is_named_by_the_latest_call_with_its_id() -> None:
    """Clients that send no ids get `call_0` in every message: a result belongs to the call just before it."""
    def call(name: str) -> dict:
        return {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": name, "arguments": "{}"}}]}

    history = [{"role": "user", "content": "go"}, call("get_weather"),
               {"role": "tool", "tool_call_id": "call_0", "content": "21 degrees"}, call("search"),
               {"role": "tool", "tool_call_id": "call_0", "content": "3 hits"}]
    out, _ = tools.for_template("{{ messages }}", history, [FN], shows_tools=False)
    results = [m["content"] for m in out if m["content"].startswith("Result of")]
    assert results == ["Result of get_weather: 21 degrees", "Result of search: 3 hits"]


@pytest.mark.parametrize("parameters", [{"type": "string"}, {"anyOf": [{"type": "object"}, {"type": "string"}]},
                                        {"type": "object", "anyOf": [{"type": "string"}]},
                                        {"$ref": "#/$defs/A", "$defs": {"A": {"type": "object"}}}])
def test_parameters_must_be_an_object_schema_at_the_top(parameters: dict) -> None:
    """Anything else could make a forced call's arguments something other than an object (llama.cpp's grammar
    gives anyOf the upper hand over type), as OpenAI's API refuses it."""
    from pydantic import ValidationError

    from lmsd.http.schemas import ChatRequest

    with pytest.raises(ValidationError, match="object"):
        ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [
            {"type": "function", "function": {"name": "f", "parameters": parameters}}]})
    ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {}}},
        {"type": "function", "function": {"name": "g", "parameters": {"properties": {"a": {"anyOf": [{}]}}}}}]})


RECORDINGS = sorted((Path(__file__).parents[1] / "data" / "tool_outputs").glob("*.json"))


def test_there_are_recordings_of_real_models() -> None:
    assert RECORDINGS  # an empty folder must not pass as "every recording reads right"


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.stem)
def test_what_real_models_wrote_reads_as_it_was_judged_when_recorded(path: Path) -> None:
    """Answers a real model wrote to chats offering tools, as lmsd renders them (scripts/record_tool_outputs.py:
    SmolLM2 answers in prose, in Python, repeats the tool definitions from its prompt as JSON — cut short or not —
    and repeats a call after its result). Each reads as it was judged when recorded, whole and streamed in any
    split."""
    data = json.loads(path.read_text())
    names = {t["function"]["name"] for t in data["tools"]}
    for recording in data["recordings"]:
        text = recording["output"]
        content, calls = tools.parse(text, data["format"], names)
        got = {"content": content, "calls": [{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls]}
        assert got == recording["read_as"], text
        stream = tools.ToolStream()
        sent = "".join(stream.feed(text[i : i + 2]) for i in range(0, len(text), 2))
        rest, streamed = stream.finish(data["format"], names)
        assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls]
        assert (sent + rest).strip() == content.strip() if calls else sent + rest == text


def test_an_agents_tools_are_taken_as_they_are_unless_a_call_of_them_is_forced() -> None:
    """MCP servers' schemas carry what a grammar cannot be built from (zod's lookahead patterns, big counts, long
    descriptions): offering them is fine — the model only reads them —, forcing a call of them is a 400."""
    from pydantic import ValidationError

    from lmsd.http.schemas import ChatRequest

    mcp = {"type": "function", "function": {"name": "send_mail", "description": "Sends a mail. " * 1500,
                                            "parameters": {"type": "object", "properties": {
                                                "to": {"type": "string", "pattern": r"^(?!\.)[^@\s]+@[^@\s]+$"},
                                                "body": {"type": "string", "maxLength": 100000},
                                                "cc": {"type": "array", "items": {"type": "string"},
                                                       "maxItems": 500}}}}}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [mcp]}
    for choice in (None, "auto", "none"):
        ChatRequest.model_validate({**body, "tool_choice": choice})
    with pytest.raises(ValidationError):
        ChatRequest.model_validate({**body, "tool_choice": "required"})


def test_calls_written_as_xml_read_with_their_schemas() -> None:
    """Qwen3-Coder and GLM-4.5 templates carry <tool_call> but their models write XML inside it; a value is text
    where the function's schema says string, else the JSON it spells."""
    schemas = {"get_weather": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                                "zip": {"type": "string"}}},
               "search": None}
    qwen3 = ("I'll check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n"
             "<parameter=days>\n3\n</parameter>\n<parameter=zip>\n10001\n</parameter>\n</function>\n</tool_call>")
    content, calls = tools.parse(qwen3, "hermes", schemas)
    assert content == "I'll check." and [(c.name, json.loads(c.arguments)) for c in calls] == \
        [("get_weather", {"city": "New York", "days": 3, "zip": "10001"})]
    glm = "<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>lms server</arg_value>\n</tool_call>"
    assert [(c.name, json.loads(c.arguments)) for c in tools.parse(glm, "hermes", schemas)[1]] == \
        [("search", {"q": "lms server"})]
    for cut in ("<tool_call>\n<function=get_weather>\n<parameter=ci",  # cut short by max_tokens: text
                "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
                "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n",
                "<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>lms"):
        assert tools.parse(cut, "hermes", schemas) == (cut, [])
    unknown = "<tool_call>\n<function=rm_rf>\n</function>\n</tool_call>"
    assert tools.parse(unknown, "hermes", schemas) == (unknown, [])
    two = ("<tool_call><function=get_weather><parameter=city>Oslo</parameter></function>\n"
           "<function=search><parameter=q>x</parameter></function></tool_call>")
    assert [(c.name, json.loads(c.arguments)) for c in tools.parse(two, "hermes", schemas)[1]] == \
        [("get_weather", {"city": "Oslo"}), ("search", {"q": "x"})]  # two functions, two calls: never merged
    sneaky = two.replace("<function=search>", "<function=rm_rf>")
    assert tools.parse(sneaky, "hermes", schemas) == (sneaky, [])  # one of them not offered: all text
    json_inside = '<tool_call><function=search>{"q": "x"}</function></tool_call>'  # Llama 3.1's style
    assert [json.loads(c.arguments) for c in tools.parse(json_inside, "hermes", schemas)[1]] == [{"q": "x"}]
    for bad in ["<tool_call><function=search>not json</function></tool_call>",
                "<tool_call><function=search>blah<parameter=q>x</parameter>junk</function></tool_call>",
                '<tool_call>{"name": "search", "arguments": {"n": NaN}}</tool_call>',  # JSON no client can read
                '<tool_call>{"name": "search", "arguments": {"n": 1e999}}</tool_call>',
                "<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>x</arg_value>",  # no </tool_call>: cut short
                "<tool_call>search\n<arg_key>q</arg_key><arg_value>x</arg_value>\nrm_rf<arg_key>p</arg_key>"
                "<arg_value>/</arg_value></tool_call>"]:
        assert tools.parse(bad, "hermes", schemas) == (bad, []), bad
    numbers = "<tool_call><function=search><parameter=n>NaN</parameter><parameter=m>1e999</parameter></function>" \
              "</tool_call>"  # not numbers JSON can carry: their text
    assert json.loads(tools.parse(numbers, "hermes", schemas)[1][0].arguments) == {"n": "NaN", "m": "1e999"}
    # A schema whose properties are not an object (taken as offered) does not break the reading.
    odd = {"search": {"type": "object", "properties": ["q"]}}
    one = "<tool_call><function=search><parameter=q>x</parameter></function></tool_call>"
    assert [json.loads(c.arguments) for c in tools.parse(one, "hermes", odd)[1]] == [{"q": "x"}]
    # A string parameter defined by anyOf, enum or const stays text.
    typed = {"f": {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                                                     "b": {"enum": ["1", "2"]}, "c": {"type": "number"}}}}
    call = "<tool_call><function=f><parameter=a>123</parameter><parameter=b>1</parameter>" \
           "<parameter=c>2.5</parameter></function></tool_call>"
    assert json.loads(tools.parse(call, "hermes", typed)[1][0].arguments) == {"a": "123", "b": "1", "c": 2.5}
