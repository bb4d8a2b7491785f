"""Records what a real model writes when a chat offers it tools, for the parser's tests
(tests/data/tool_outputs/*.json, read by tests/unit/test_tools.py).

Each prompt goes through the worker's engine exactly as lmsd renders it (the model's own template, the tools as
lmsd passes them: the generic preamble for SmolLM2, whose template has no tool support) and the model answers at
temperature 0, unconstrained (`tool_choice: "auto"`). The answer is stored raw, as the model wrote it, with the
outcome the parser gave when it was recorded; the test checks the parser still reads each one that way. Run it
again after a change to the prompt lmsd renders, and look at what changed before committing the new recordings:

    python scripts/record_tool_outputs.py [MODEL.gguf] > tests/data/tool_outputs/smollm2-135m-instruct.json

Without MODEL.gguf it takes SmolLM2-135M-Instruct from the test cache (fetching it as the tests do).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"]}}}

CHATS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is the weather in Paris right now?"}],
    [{"role": "user", "content": "Call get_weather for Oslo."}],
    [{"role": "user", "content": "Search the web for the tallest building in the world."}],
    [{"role": "user", "content": "What is 17 plus 25? Use the add function."}],
    [{"role": "user", "content": "Hello! How are you today?"}],
    [{"role": "user", "content": "Write a haiku about autumn."}],
    [{"role": "system", "content": "You are a helpful assistant. Use the tools when they help."},
     {"role": "user", "content": "I need the weather in Rome and Oslo."}],
    [{"role": "user", "content": "Answer with only the JSON object that calls get_weather for Oslo."}],
    [{"role": "user", "content": "Give me the JSON to call search with the query 'lms local model server'."}],
    [{"role": "user", "content": "Call add with a=2 and b=3, then call get_weather for Rome. Answer in JSON."}],
    [{"role": "user", "content": "Reply with a JSON list of two calls: get_weather for Paris and for Oslo."}],
    [{"role": "user", "content": "What is the weather in Paris?"},
     {"role": "assistant", "content": None, "tool_calls": [
         {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
     {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, clear sky"}],
]


def record(model: Path) -> dict[str, Any]:
    import llama_cpp

    from lmsd import tools as tool_calls
    from lmsd.http.schemas import ChatRequest
    from lmsd.worker.batch import BatchEngine

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=4096, verbose=False)
    engine = BatchEngine(llm, lambda *_a, **_k: None)
    offered = [WEATHER, SEARCH, ADD]
    names = {t["function"]["name"] for t in offered}
    fmt = tool_calls.family(llm.metadata.get("tokenizer.chat_template"))
    out = []
    for messages in CHATS:
        params = ChatRequest.model_validate({"model": "m", "messages": messages, "tools": offered}).worker_params()
        prompt, stops = engine._chat_prompt(params)
        answer = llm.create_completion(prompt, max_tokens=120, temperature=0.0, stop=stops or None)
        text = answer["choices"][0]["text"]
        content, calls = tool_calls.parse(text, fmt, names)
        out.append({"messages": messages, "output": text,
                    "read_as": {"content": content,
                                "calls": [{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls]}})
    llm.close()
    return {"model": model.name, "format": fmt, "tools": offered, "llama_cpp_python": llama_cpp.__version__,
            "recordings": out}


def main() -> None:
    if len(sys.argv) > 1:
        model = Path(sys.argv[1])
    else:
        from lmscli.fetch import SOURCES
        from tests.conftest import SMOLLM2_KEY, test_cache

        model = SOURCES[SMOLLM2_KEY].fetch(test_cache() / "models")
    json.dump(record(model), sys.stdout, indent=1, ensure_ascii=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
