"""Tool calling as agents use it: the official `openai` SDK against the real daemon, on SmolLM2 (whose template
has no tool support: the generic preamble) and on the generated tiny model (random weights), with
`tool_choice: "required"` or a named function so that the grammar makes the answer a call whatever the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SMOLLM2_KEY
from tests.e2e.conftest import Server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Rome"]},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 40}},
                   "required": ["query"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def test_a_required_call_then_the_answer_from_its_result(server: Server) -> None:
    """The two-turn loop an agent runs: the model calls, the client runs the function and sends the result back,
    the model answers in words."""
    client: Any = server.openai()
    first = client.chat.completions.create(model=SMOLLM2_KEY, messages=ASK, tools=[WEATHER, SEARCH],
                                           tool_choice="required", temperature=0, max_tokens=80)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in ("get_weather", "search")
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments, dict) and set(arguments) >= ({"city"} if call.function.name == "get_weather"
                                                             else {"query"})
    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    second = client.chat.completions.create(model=SMOLLM2_KEY, messages=history, tools=[WEATHER, SEARCH],
                                            tool_choice="none", temperature=0, max_tokens=40)
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].message.content and second.choices[0].finish_reason in ("stop", "length")


def test_a_named_function_streams_as_delta_tool_calls(server: Server) -> None:
    client: Any = server.openai()
    stream = client.chat.completions.create(
        model=SMOLLM2_KEY, messages=ASK, tools=[WEATHER, SEARCH], stream=True, temperature=0, max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stream_options={"include_usage": True})
    content, calls, finish, usage, pieces = _joined(stream)
    assert finish == "tool_calls" and content == ""
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"])["city"] in ("Paris", "Oslo", "Rome")
    assert usage is not None and usage.completion_tokens > 0
    assert pieces >= 4  # the arguments came as the model wrote them, token by token (`{"city": "Paris"}` is 6)
    # Cut by max_tokens while the arguments are being written: what was written, and finish_reason "length".
    cut = client.chat.completions.create(
        model=SMOLLM2_KEY, messages=ASK, tools=[WEATHER, SEARCH], stream=True, temperature=0, max_tokens=15,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    content, calls, finish, _usage, _pieces = _joined(cut)
    assert finish == "length" and content == "" and calls[0]["name"] == "get_weather"
    assert calls[0]["arguments"].startswith("{")
    with pytest.raises(ValueError):
        json.loads(calls[0]["arguments"])
    # Stop sequences do not cut a forced call (its grammar ends it): a quote is in every call's JSON.
    stopped = client.chat.completions.create(
        model=SMOLLM2_KEY, messages=ASK, tools=[WEATHER, SEARCH], temperature=0, max_tokens=80, stop=['"', "city"],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert stopped.choices[0].finish_reason == "tool_calls"
    assert json.loads(stopped.choices[0].message.tool_calls[0].function.arguments)["city"] in ("Paris", "Oslo", "Rome")


def _joined(stream: Any) -> tuple[str, dict[int, dict[str, str]], str | None, Any, int]:
    """A streamed chat answer as a client puts it together: content, calls by index, finish_reason, usage, and how
    many pieces of arguments came."""
    calls: dict[int, dict[str, str]] = {}
    finish, usage, content, pieces = None, None, "", 0
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += d.id or ""
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
                pieces += bool(d.function and d.function.arguments)
    return content, calls, finish, usage, pieces


def test_the_tiny_model_forced_to_call_returns_a_call_that_validates(server: Server) -> None:
    """Random weights: only the grammar stands between its output and a call. Parallel calls: a list."""
    client: Any = server.openai()
    reply = client.chat.completions.create(model="alpha", messages=ASK, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=True, temperature=0, seed=7, max_tokens=300)
    calls = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls" and 1 <= len(calls) <= 8
    for call in calls:
        args = json.loads(call.function.arguments)
        assert call.function.name == "get_weather" and args["city"] in ("Paris", "Oslo", "Rome")
        assert set(args) <= {"city", "unit"}


def test_a_model_whose_template_shows_tools_runs_the_agent_loop(server: Server, smollm2_file: Path,
                                                               tmp_path: Path) -> None:
    """A tiny model carrying a Hermes (Qwen 2.5) template, dropped into the models folder while lmsd runs: JIT-loaded
    by the first request, the tools shown by its own template, a forced call, then the history with the call and
    its result rendered by the template too (tests/integration/test_chat_templates.py reads those prompts)."""
    from tests.support.templates import HERMES
    from tests.support.tinymodel import write_tiny_model

    server.home.add(write_tiny_model(tmp_path / "h.gguf", smollm2_file, chat_template=HERMES),
                    "test/hermes-tiny/hermes-tiny.F16.gguf")
    client: Any = server.openai()
    first = client.chat.completions.create(model="hermes-tiny", messages=ASK, tools=[WEATHER, SEARCH],
                                           tool_choice="required", temperature=0, seed=3, max_tokens=200)
    (call,) = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name in ("get_weather", "search")
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "21 degrees"}]
    second = client.chat.completions.create(model="hermes-tiny", messages=history, tools=[WEATHER, SEARCH],
                                            temperature=0, max_tokens=8)
    # The call (<tool_call>, its name and arguments) and its result (<tool_response>) are in the prompt.
    assert second.usage.prompt_tokens >= first.usage.prompt_tokens + 20
    assert [(m["model"], m["origin"]) for m in server.loaded()] == [("hermes-tiny", "jit")]


def test_tools_offered_but_not_called_is_plain_content_never_an_error(server: Server) -> None:
    """tool_choice auto on a model that writes noise: whatever it writes is content (200), not a 500."""
    with server.client() as http:
        r = http.post("/v1/chat/completions", json={"model": "alpha", "messages": ASK, "tools": [WEATHER],
                                                    "temperature": 0, "max_tokens": 12})
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        assert isinstance(message["content"], str) and "tool_calls" not in message
        v0 = http.post("/api/v0/chat/completions", json={"model": SMOLLM2_KEY, "messages": ASK, "tools": [WEATHER],
                                                         "tool_choice": "required", "max_tokens": 60})
        assert v0.status_code == 200, v0.text
        assert v0.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_bad_tool_requests_are_400_and_load_nothing(server: Server) -> None:
    cases = [
        ({"tools": [{"type": "web_search"}]}, "tools of type 'web_search' are not supported"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
        ({"tool_choice": "required"}, "needs `tools`"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "name"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "cannot be combined"),
    ]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for extra, says in cases:
            r = http.post("/v1/chat/completions", json={"model": SMOLLM2_KEY, "messages": ASK, **extra})
            assert r.status_code == 400 and says in r.json()["error"]["message"], (extra, r.text)
    assert server.loaded() == []


# ---------------------------------------------------------------- /v1/responses


def test_responses_a_function_call_then_previous_response_id(server: Server) -> None:
    """OpenAI's Responses API through the official SDK: a forced function call, its output sent back with
    previous_response_id, then an answer in words; and the same as a stream of typed events."""
    client: Any = server.openai()
    tool = {"type": "function", **WEATHER["function"]}
    first = client.responses.create(model=SMOLLM2_KEY, input="What is the weather in Paris right now?",
                                    instructions="You are a helpful assistant.", tools=[tool],
                                    tool_choice="required", temperature=0, max_output_tokens=80,
                                    extra_body={"ttl": 90})
    assert [(i["model"], i["origin"], i["ttl_seconds"]) for i in server.loaded()] == [(SMOLLM2_KEY, "jit", 90)]
    assert first.status == "completed" and first.id.startswith("resp_")
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Oslo", "Rome")
    result = [{"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temperature": 21})}]
    second = client.responses.create(model=SMOLLM2_KEY, previous_response_id=first.id, tools=[tool], input=result,
                                     tool_choice="none", temperature=0, max_output_tokens=30)
    alone = client.responses.create(model=SMOLLM2_KEY, tools=[tool], input=result, tool_choice="none",
                                    temperature=0, max_output_tokens=1)
    assert second.output_text and second.status in ("completed", "incomplete")
    assert second.usage.input_tokens > alone.usage.input_tokens + 10  # the question and the call came along
    events = list(client.responses.create(model=SMOLLM2_KEY, input="Say hello.", stream=True, max_output_tokens=8))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in ("response.completed",
                                                                                     "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and events[-1].response.output[0].content[0].text == text
    calls = list(client.responses.create(model=SMOLLM2_KEY, input="Weather in Oslo?", stream=True, tools=[tool],
                                         tool_choice="required", max_output_tokens=80))
    deltas = [e.delta for e in calls if e.type == "response.function_call_arguments.delta"]
    assert json.loads("".join(deltas))["city"] in ("Paris", "Oslo", "Rome") and len(deltas) >= 4  # as written
    with httpx.Client(base_url=server.url, timeout=30) as http:
        r = http.post("/v1/responses", json={"model": SMOLLM2_KEY, "input": "hi",
                                             "tools": [{"type": "web_search_preview"}]})
        assert r.status_code == 400 and "no built-in tools" in r.json()["error"]["message"]
        r = http.post("/v1/responses", json={"model": SMOLLM2_KEY, "input": "hi", "previous_response_id": "resp_x"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"


# ---------------------------------------------------------------- /v1/messages


def test_anthropic_messages_tool_use_round_trip_and_stream(server: Server) -> None:
    import anthropic

    client = anthropic.Anthropic(base_url=server.url, api_key="not-needed", max_retries=0, timeout=120)
    tool = {"name": "get_weather", "description": "The current weather in a city.",
            "input_schema": WEATHER["function"]["parameters"]}
    first = client.messages.create(model=SMOLLM2_KEY, max_tokens=80, tools=[tool],  # type: ignore[list-item]
                                   tool_choice={"type": "any"}, extra_body={"ttl": 75},
                                   messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    assert [(i["model"], i["origin"], i["ttl_seconds"]) for i in server.loaded()] == [(SMOLLM2_KEY, "jit", 75)]
    assert first.stop_reason == "tool_use" and first.role == "assistant"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input["city"] in ("Paris", "Oslo", "Rome")  # type: ignore[index]
    second = client.messages.create(
        model=SMOLLM2_KEY, max_tokens=30, tools=[tool], tool_choice={"type": "none"},  # type: ignore[list-item]
        messages=[{"role": "user", "content": "What is the weather in Paris?"},
                  {"role": "assistant", "content": first.content},  # type: ignore[typeddict-item]
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                "content": "21 degrees, clear sky"}]}])
    assert second.stop_reason in ("end_turn", "max_tokens") and second.content[0].type == "text"
    # Anthropic's meaning: input_tokens leave out what was read from the cache (the first turn's prompt, mostly).
    assert second.usage.input_tokens + (second.usage.cache_read_input_tokens or 0) > 20
    assert second.usage.output_tokens > 0
    with client.messages.stream(model=SMOLLM2_KEY, max_tokens=8, system="Be brief.",
                                messages=[{"role": "user", "content": "Say hello."}]) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed and final.content[0].text == streamed  # type: ignore[union-attr]
    with client.messages.stream(model=SMOLLM2_KEY, max_tokens=80, tools=[tool],  # type: ignore[list-item]
                                tool_choice={"type": "tool", "name": "get_weather"},
                                messages=[{"role": "user", "content": "Weather in Rome?"}]) as stream:
        kinds = [event.type for event in stream]
        streamed_call = stream.get_final_message()
    assert kinds.count("input_json") >= 4 and streamed_call.stop_reason == "tool_use"  # as the model writes it
    (block,) = streamed_call.content
    assert block.type == "tool_use" and block.input["city"] in ("Paris", "Oslo", "Rome")  # type: ignore[union-attr]
    metrics = httpx.get(server.url + "/metrics").text
    assert 'endpoint="/v1/messages"' in metrics  # counted under its own endpoint, as lms log stream names it
    stopped = client.messages.create(model=SMOLLM2_KEY, max_tokens=40, stop_sequences=["\n", " "],
                                     messages=[{"role": "user", "content": "Write two sentences about Paris."}])
    assert stopped.stop_reason in ("stop_sequence", "max_tokens", "end_turn")
    if stopped.stop_reason == "stop_sequence":
        assert stopped.stop_sequence in ("\n", " ")
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model=SMOLLM2_KEY, max_tokens=8, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}])
    assert "image" in str(bad.value)
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    # Claude Code and the like send their own model's max_tokens: here it means what the context leaves.
    big = client.messages.create(model=SMOLLM2_KEY, max_tokens=32000, stop_sequences=[" ", "\n"],
                                 messages=[{"role": "user", "content": "Write a sentence about Paris."}])
    assert big.stop_reason in ("stop_sequence", "end_turn")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        r = http.post("/v1/messages", json={"model": SMOLLM2_KEY, "max_tokens": 8, "messages": [
            {"role": "user", "content": [{"type": "text", "text": 5}]}]})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
        assert "messages.0.content.0.text" in r.text
        r = http.post("/v1/messages", json={"model": SMOLLM2_KEY, "max_tokens": 8, "messages": ASK, "tools": [
            {"name": "get_weather", "input_schema": {"type": "string"}}]})  # named as this API names it
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("tools.0.input_schema: "), r.text


def test_lms_log_stream_names_the_agent_endpoints(server: Server) -> None:
    """A request to /v1/responses or /v1/messages is one line in `lms log stream`, under its own endpoint, refused
    ones too."""
    import subprocess
    import time

    proc = subprocess.Popen([server.lms.exe, "log", "stream", "--json", "--filter", "request"], env=server.home.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # let the watcher subscribe before the events happen
        with server.client() as http:
            assert http.post("/v1/responses", json={"model": "alpha", "input": "hi", "max_output_tokens": 4,
                                                    "ttl": 30}).status_code == 200
            assert http.post("/v1/messages", json={"model": "alpha", "max_tokens": 4,
                                                   "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
            assert http.post("/v1/messages", json={"model": "alpha", "max_tokens": 4, "messages": [
                {"role": "user", "content": [{"type": "image"}]}]}).status_code == 400
        events = [json.loads(proc.stdout.readline()) for _ in range(3)]  # type: ignore[union-attr]
    finally:
        proc.terminate()
        proc.wait(10)
    assert [(e["endpoint"], e["status"]) for e in events[:2]] == [("/v1/responses", "ok"), ("/v1/messages", "ok")]
    assert events[2]["endpoint"] == "/v1/messages" and "'image' are not supported" in events[2]["status"]
    assert events[0]["identifier"] == "alpha" and events[0]["completion_tokens"] > 0


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/messages", {"max_tokens": 3000}),
    ("/v1/responses", {"max_output_tokens": 3000}),
])
def test_a_client_leaving_an_agent_stream_stops_the_generation(server: Server, path: str, body: dict) -> None:
    """An agent closed mid-answer (Ctrl-C in Claude Code, a dropped connection): the worker stops within a few
    tokens and the instance serves the next request, on each agent endpoint."""
    import re

    from tests.conftest import wait_until

    count = "Count from 1 to 2000, one number per line, and nothing else."
    prompt = ({"messages": [{"role": "user", "content": count}]} if path == "/v1/messages"
              else {"input": count, "temperature": 0})
    received = 0
    with server.client() as c, c.stream("POST", path, json={"model": SMOLLM2_KEY, "stream": True, **prompt,
                                                            **body}) as r:
        for line in r.iter_lines():
            received += line.startswith("data: ") and "delta" in line
            if received == 5:
                break
    wait_until(lambda: server.loaded()[0]["status"] == "idle", timeout=5, what="the instance to be idle")
    logged = (server.home.root / "logs" / "lmsd.log").read_text()
    line = re.search(rf"request {re.escape(path)} {SMOLLM2_KEY}: client disconnected, \d+ in / (\d+) out", logged)
    assert line and int(line.group(1)) < 60, logged[-2000:]  # stopped within a few tokens, not 3000
    with server.client() as c:
        assert c.post(path, json={"model": SMOLLM2_KEY, **prompt, **body, "stream": False,
                                  "max_tokens" if path == "/v1/messages" else "max_output_tokens": 4}
                      ).status_code == 200
