"""How the three agent APIs shape an answer's calls, streamed and whole, with a fake inference that replays a
scripted answer in small pieces: the order of their events, and what they say when max_tokens cut the calls.
(The real daemon, model and SDKs are in tests/e2e/test_tools.py; this is the shaping logic alone, for answers a
small real model does not write on demand.)"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient

from lmsd.http import anthropic, openai, responses
from lmsd.http.errors import HttpError, error_response


class Script:
    """The answer the fake model writes, in pieces of three characters, and why it stopped."""

    text = ""
    finish = "stop"
    tool_format = "generic"


class FakeInference:
    chat: Any = None  # the chat request the last request became

    async def start(self, _request: Any, body: Any, _kind: str, _endpoint: str) -> Any:
        FakeInference.chat = body
        usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12,
                 "prompt_tokens_details": {"cached_tokens": 3}}
        return SimpleNamespace(identifier="m", done={}, usage=lambda: usage)

    async def tokens(self, gen: Any) -> Any:
        for i in range(0, len(Script.text), 3):
            yield Script.text[i : i + 3]
        gen.done.update(finish_reason=Script.finish, tool_format=Script.tool_format)

    async def collect(self, _request: Any, gen: Any) -> str:
        gen.done.update(finish_reason=Script.finish, tool_format=Script.tool_format)
        return Script.text

    async def finish(self, _gen: Any) -> None:
        return None


@pytest.fixture(scope="module")
def http() -> TestClient:
    app = FastAPI()
    fake = FakeInference()
    app.include_router(openai.router(fake, lambda: []))  # type: ignore[arg-type]
    app.include_router(anthropic.router(fake))  # type: ignore[arg-type]
    app.include_router(responses.router(fake))  # type: ignore[arg-type]

    @app.exception_handler(HttpError)
    async def _refused(request: Request, exc: HttpError) -> Response:  # as lmsd/http/server.py answers them
        return error_response(exc, request.url.path)

    return TestClient(app)


def events(body: str) -> list[dict[str, Any]]:
    out = []
    for block in body.split("\n\n"):
        data = [line[6:] for line in block.splitlines() if line.startswith("data: ")]
        if data and data[0] != "[DONE]":
            out.append(json.loads(data[0]))
    return out


def ask(http: TestClient, text: str, finish: str, *, forced: bool = True) -> dict[str, Any]:
    """The scripted answer through each API, streamed: what a client of each puts together."""
    Script.text, Script.finish = text, finish
    fns = [{"name": n, "parameters": {"type": "object"}} for n in ("f", "g")]
    chat = events(http.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True, "parallel_tool_calls": True,
        "tools": [{"type": "function", "function": f} for f in fns], "tool_choice": "required" if forced else "auto",
    }).text)
    args: dict[int, str] = {}
    for e in chat:
        for d in (e["choices"] or [{}])[0].get("delta", {}).get("tool_calls") or []:
            args[d["index"]] = args.get(d["index"], "") + d["function"].get("arguments", "")
    messages = events(http.post("/v1/messages", json={
        "model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": "x"}], "stream": True,
        "tools": [{"name": f["name"], "input_schema": f["parameters"]} for f in fns],
        "tool_choice": {"type": "any" if forced else "auto"}}).text)
    replies = events(http.post("/v1/responses", json={
        "model": "m", "input": "x", "stream": True, "parallel_tool_calls": True,
        "tools": [{"type": "function", **f} for f in fns], "tool_choice": "required" if forced else "auto"}).text)
    final = replies[-1]["response"]
    return {"finish": [c["finish_reason"] for e in chat for c in e["choices"] if c["finish_reason"]],
            "arguments": args,
            "blocks": [e["type"].removeprefix("content_block_") for e in messages if "content_block" in e["type"]],
            "stop_reason": [e["delta"]["stop_reason"] for e in messages if e["type"] == "message_delta"],
            "status": (replies[-1]["type"], final["status"], [o["status"] for o in final["output"]])}


def test_several_forced_calls_stream_whole(http: TestClient) -> None:
    got = ask(http, '[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": "x"}}]', "stop")
    assert got["finish"] == ["tool_calls"] and got["arguments"] == {0: '{"a": 1}', 1: '{"b": "x"}'}
    assert got["blocks"][0] == "start" and got["blocks"].count("start") == got["blocks"].count("stop") == 2
    assert got["stop_reason"] == ["tool_use"]
    assert got["status"] == ("response.completed", "completed", ["completed", "completed"])


@pytest.mark.parametrize("text", ['[{"name": "f", "arguments": {"a": 1}}, {"name": "g", "arguments": {"b": "x',
                                  '[{"name": "f", "arguments": {"a": 1}}, {"na'])
def test_calls_cut_by_max_tokens_say_so_in_every_api(http: TestClient, text: str) -> None:
    """Cut inside the second call, or between the calls: the first is whole, but the answer is not."""
    got = ask(http, text, "length")
    assert got["finish"] == ["length"] and got["arguments"][0] == '{"a": 1}'
    assert got["stop_reason"] == ["max_tokens"]
    assert got["status"][:2] == ("response.incomplete", "incomplete") and got["status"][2][0] == "completed"
    assert got["blocks"].count("start") == got["blocks"].count("stop")  # every block opened is closed


def test_a_call_the_model_makes_on_its_own_comes_after_its_text(http: TestClient) -> None:
    Script.tool_format = "hermes"
    try:
        got = ask(http, 'Let me look.\n<tool_call>\n{"name": "g", "arguments": {"b": 2}}\n</tool_call>', "stop",
                  forced=False)
    finally:
        Script.tool_format = "generic"
    assert got["finish"] == ["tool_calls"] and got["arguments"] == {0: '{"b": 2}'}
    assert got["blocks"][0] == "start" and got["stop_reason"] == ["tool_use"]
    assert got["status"] == ("response.completed", "completed", ["completed", "completed"])  # the text, the call


def test_an_answer_nested_past_the_json_decoder_is_text_not_a_500(http: TestClient) -> None:
    Script.text, Script.finish = "[" * 3000, "length"
    whole = http.post("/v1/chat/completions", json={
        "model": "m", "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert whole.status_code == 200 and whole.json()["choices"][0]["message"]["content"] == "[" * 3000
    got = ask(http, "[" * 3000, "length", forced=False)
    assert got["finish"] == ["length"] and got["arguments"] == {}


def test_what_agents_keep_in_their_history_does_not_break_the_next_turn(http: TestClient) -> None:
    """An agent's screenshot in a tool result, another model's thinking or reasoning, a function's output as parts,
    a message and its calls as separate items: all go on, as text the model can read."""
    Script.text, Script.finish = "ok", "stop"
    shot = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}}
    r = http.post("/v1/messages", json={"model": "m", "max_tokens": 9, "messages": [
        {"role": "user", "content": "Look at the screen."},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "x"},
                                          {"type": "tool_use", "id": "t1", "name": "screenshot", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": [{"type": "text", "text": "the screen:"}, shot]}]}]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"] == {"input_tokens": 2, "output_tokens": 7, "cache_read_input_tokens": 3,
                                 "cache_creation_input_tokens": 0}  # Anthropic's meaning: the cache read apart
    (result,) = [m for m in FakeInference.chat.messages if m.role == "tool"]
    assert result.content == "the screen:\n[image omitted: this model reads text only]"
    r = http.post("/v1/responses", json={"model": "m", "input": [
        {"role": "user", "content": "List the files."},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Listing."}]},
        {"type": "function_call", "call_id": "c1", "name": "ls", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "a.txt"}]}]})
    assert r.status_code == 200, r.text
    roles = [(m.role, m.content, len(m.tool_calls or [])) for m in FakeInference.chat.messages]
    assert roles == [("user", "List the files.", 0), ("assistant", "Listing.", 1), ("tool", "a.txt", 0)]
    reference = http.post("/v1/responses", json={"model": "m", "input": [{"type": "item_reference", "id": "fc_1"}]})
    assert reference.status_code == 400 and "item_reference" in reference.text  # not resolvable here: said so
    for extra in ({"conversation": "conv_1"}, {"background": True}):
        refused = http.post("/v1/responses", json={"model": "m", "input": "hi", **extra})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == next(iter(extra))


def test_parallel_tool_calls_false_answers_only_the_first_call(http: TestClient) -> None:
    Script.tool_format = "hermes"
    two = '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>'
    try:
        Script.text, Script.finish = two, "stop"
        fns = [{"type": "function", "function": {"name": n}} for n in ("f", "g")]
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": fns}
        calls = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["tool_calls"]
        assert [c["function"]["name"] for c in calls] == ["f", "g"]
        one = http.post("/v1/chat/completions", json={**body, "parallel_tool_calls": False})
        assert [c["function"]["name"] for c in one.json()["choices"][0]["message"]["tool_calls"]] == ["f"]
        blocks = http.post("/v1/messages", json={
            "model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": "x"}],
            "tools": [{"name": n, "input_schema": {}} for n in ("f", "g")],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}).json()["content"]
        assert [b["name"] for b in blocks if b["type"] == "tool_use"] == ["f"]
    finally:
        Script.tool_format = "generic"


def test_a_responses_stream_counts_from_zero_and_marks_a_cut_message(http: TestClient) -> None:
    Script.text, Script.finish = "Once upon a", "length"
    got = events(http.post("/v1/responses", json={"model": "m", "input": "x", "stream": True}).text)
    assert [e["sequence_number"] for e in got] == list(range(len(got)))
    assert all(e["logprobs"] == [] for e in got if e["type"].startswith("response.output_text."))
    final = got[-1]["response"]
    assert got[-1]["type"] == "response.incomplete" and final["output"][0]["status"] == "incomplete"
    assert final["parallel_tool_calls"] is True  # OpenAI's default, when nothing is forced
    assert final["output"][0]["content"][0]["text"] == "Once upon a"
