"""Tool calling's prompts, rendered for real: a chat request as the HTTP layer turns it into the worker's
parameters, through the worker's engine and llama-cpp-python's sandboxed Jinja formatter, with tiny models that
carry the chat templates of the tool-calling families (tests/support/templates.py). What the model would read is
the detokenized prompt."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmsd.http.schemas import ChatRequest
from lmsd.worker.batch import BatchEngine
from tests.support import templates
from tests.support.tinymodel import write_tiny_model

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# The two-turn loop as the openai SDK sends its second request: the call (arguments as a JSON string) and its result.
LOOP = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_Xq7eR2mJ0aBcDeFgHiJkLmNo", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_Xq7eR2mJ0aBcDeFgHiJkLmNo", "content": "21 degrees, clear sky"}]


@pytest.fixture(scope="module")
def render(smollm2_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """render(template, body) -> (the prompt as the model reads it, the tool-call format its answer is read in)."""
    import llama_cpp

    loaded: dict[str, Any] = {}

    def _render(template: str, body: dict[str, Any]) -> tuple[str, str]:
        if template not in loaded:
            path = write_tiny_model(tmp_path_factory.mktemp("tpl") / "m.gguf", smollm2_file, chat_template=template)
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, verbose=False)
            loaded[template] = (llm, BatchEngine(llm, lambda *_a, **_k: None))
        llm, engine = loaded[template]
        params = ChatRequest.model_validate({"model": "m", **body}).worker_params()
        tokens, _stops = engine._chat_prompt(params)
        from lmsd import tools

        fmt = tools.family(llm.metadata.get("tokenizer.chat_template")) if params.get("tools") else ""
        return llm.detokenize(tokens, special=True).decode("utf-8"), fmt

    yield _render
    for llm, _engine in loaded.values():
        llm.close()


def test_a_hermes_template_shows_the_tools_and_the_call_and_result(render: Any) -> None:
    prompt, fmt = render(templates.HERMES, {"messages": LOOP, "tools": [WEATHER]})
    assert fmt == "hermes"
    tools_json = prompt.split("<tools>")[1].split("</tools>")[0]
    assert json.loads(tools_json) == WEATHER  # the tool as the template prints it, whole
    assert "Be brief." in prompt and "You can call these functions" not in prompt  # no generic preamble
    # The call in the history with its arguments as an object (a template's `tojson` of a string would quote it).
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\n21 degrees, clear sky\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_a_llama3_template_gets_the_tools_and_results_in_its_ipython_turn(render: Any) -> None:
    prompt, fmt = render(templates.LLAMA3, {"messages": LOOP, "tools": [WEATHER]})
    assert fmt == "llama3"
    assert '"name": "get_weather"' in prompt and "You can call these functions" not in prompt
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in prompt
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n21 degrees, clear sky" in prompt


def test_a_mistral_template_gets_the_nine_character_call_ids_it_insists_on(render: Any) -> None:
    prompt, fmt = render(templates.MISTRAL, {"messages": LOOP, "tools": [WEATHER]})
    assert fmt == "mistral"
    assert json.loads(prompt.split("[AVAILABLE_TOOLS]")[1].split("[/AVAILABLE_TOOLS]")[0]) == [WEATHER]
    call = json.loads(prompt.split("[TOOL_CALLS][")[1].split("]")[0])
    result = json.loads(prompt.split("[TOOL_RESULTS]")[1].split("[/TOOL_RESULTS]")[0])
    assert call["arguments"] == {"city": "Paris"} and len(call["id"]) == 9 and call["id"].isalnum()
    assert result == {"content": "21 degrees, clear sky", "call_id": call["id"]}  # the call and its result still pair


def test_a_template_without_tools_or_a_system_role_gets_the_preamble_in_the_first_user_turn(render: Any) -> None:
    """Gemma's template raises on a system message and on turns that do not alternate: the generic preamble and the
    system prompt open the first user turn, the call is written as the JSON the preamble asks for, and the result
    is a user turn."""
    prompt, fmt = render(templates.GEMMA, {"messages": LOOP, "tools": [WEATHER]})
    assert fmt == "generic"
    turns = prompt.split("<start_of_turn>")[1:]
    assert [t.split("\n")[0] for t in turns] == ["user", "model", "user", "model"]
    assert turns[0].startswith("user\nBe brief.\n\nYou can call these functions:\n")
    assert json.dumps(WEATHER["function"]) in turns[0] and turns[0].rstrip().endswith(
        "What is the weather in Paris?<end_of_turn>")
    assert json.loads(turns[1].removeprefix("model\n").split("<end_of_turn>")[0]) == \
        {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert turns[2].startswith("user\nResult of get_weather: 21 degrees, clear sky")  # named by the call's id


def test_without_tools_the_template_renders_the_chat_as_it_is(render: Any) -> None:
    """A chat without tools or calls is the template's own rendering, untouched by any of the above."""
    prompt, fmt = render(templates.HERMES, {"messages": LOOP[:2]})
    assert fmt == "" and prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                                    "What is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n")
