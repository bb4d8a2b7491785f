"""The real worker process running real llama.cpp, driven through the daemon's handle."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from lmsd.errors import ModelLoadFailed, WorkerGone
from lmsd.worker.handle import WorkerProcess
from tests.conftest import pid_alive


async def collect(worker: WorkerProcess, kind: str, params: dict) -> tuple[str, dict]:
    text = []
    done: dict = {}
    async for ev in worker.generate(kind, params):
        if ev["ev"] == "token":
            text.append(ev["text"])
        else:
            done = ev
    return "".join(text), done


async def test_tiny_model_chat_stream_with_exact_usage(tiny_file: Path, tmp_path: Path) -> None:
    worker = await WorkerProcess.spawn(tmp_path / "workers.log")
    progress: list[float] = []
    try:
        n_ctx = await worker.load(str(tiny_file), 512, progress.append)
        assert n_ctx == 512
        assert progress and progress[-1] == pytest.approx(1.0)
        assert worker.memory_bytes() > 10 * 1024 * 1024
        text, done = await collect(worker, "chat", {"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 12, "temperature": 0})
        assert text
        assert done["prompt_tokens"] > 5
        assert 1 <= done["completion_tokens"] <= 13
        assert done["finish_reason"] in ("length", "stop")
    finally:
        await worker.stop("test over")
    assert not pid_alive(worker.pid)


async def test_cancel_stops_generation_and_worker_serves_next(tiny_file: Path) -> None:
    worker = await WorkerProcess.spawn()
    try:
        await worker.load(str(tiny_file), 512, lambda f: None)
        received = 0
        stream = worker.generate("completion", {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0})
        async for _ev in stream:
            received += 1
            if received == 3:
                break
        await stream.aclose()
        # The next request runs at once and completes: the cancelled one did not keep the engine busy.
        text, done = await asyncio.wait_for(collect(worker, "completion", {"prompt": "Hello", "max_tokens": 4}), 30)
        assert done["finish_reason"] in ("length", "stop")
    finally:
        await worker.stop("test over")


async def test_smollm2_answers_with_real_text(smollm2_file: Path) -> None:
    worker = await WorkerProcess.spawn()
    try:
        await worker.load(str(smollm2_file), 1024, lambda f: None)
        prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        text, done = await collect(worker, "completion", {"prompt": prompt, "max_tokens": 16, "temperature": 0})
        assert "Paris" in text
        assert done["completion_tokens"] >= 3
    finally:
        await worker.stop("test over")


async def test_unloadable_model_fails_clearly_and_the_worker_lives(tmp_path: Path) -> None:
    bad = tmp_path / "nonsense.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    worker = await WorkerProcess.spawn()
    try:
        with pytest.raises(ModelLoadFailed, match="nonsense.gguf"):
            await worker.load(str(bad), 512, lambda f: None)
    finally:
        await worker.stop("test over")


async def test_killed_worker_fails_running_request_and_reports_exit(tiny_file: Path) -> None:
    worker = await WorkerProcess.spawn()
    exits: list[str] = []
    worker.on_exit(exits.append)
    await worker.load(str(tiny_file), 512, lambda f: None)
    stream = worker.generate("completion", {"prompt": "Once", "max_tokens": 100000, "temperature": 0,
                                            "stop": []})
    with pytest.raises(WorkerGone, match="SIGKILL"):
        async for _ev in stream:
            os.kill(worker.pid, signal.SIGKILL)
    await asyncio.wait_for(worker.exited.wait(), 10)
    assert exits == ["killed by SIGKILL"]


async def test_a_worker_that_does_not_exit_when_told_is_killed_and_reaped(tiny_file: Path, tmp_path: Path) -> None:
    worker = await WorkerProcess.spawn(tmp_path / "workers.log")
    await worker.load(str(tiny_file), 256, lambda _f: None)
    os.kill(worker.pid, signal.SIGSTOP)  # frozen: it cannot read the shutdown command
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(worker.stop("unloaded"), 30)
    waited = asyncio.get_running_loop().time() - started
    assert 9 <= waited < 25 and "SIGKILL" in worker.exit_why  # told, given 10 s, then SIGKILLed
    assert not pid_alive(worker.pid)  # and reaped: no zombie holding the memory


async def test_a_stream_ended_by_stop_says_so_and_its_end_is_reported(tiny_file: Path, tmp_path: Path) -> None:
    from lmsd.errors import WorkerStopped

    worker = await WorkerProcess.spawn(tmp_path / "workers.log")
    await worker.load(str(tiny_file), 256, lambda _f: None)
    stream = worker.generate("completion", {"prompt": "a", "max_tokens": 200, "ignore_eos": True})
    await stream.__anext__()
    await worker.stop("'tiny' was unloaded (lms unload) after a grace period of 1s")
    with pytest.raises(WorkerStopped, match="grace period"):
        while True:
            await stream.__anext__()
    assert stream.ended.done()  # the slot follows the worker: ended once the worker is gone


async def test_embeddings_take_the_whole_input_not_the_first_512_tokens(tiny_file: Path, tmp_path: Path) -> None:
    worker = await WorkerProcess.spawn(tmp_path / "workers.log")
    try:
        await worker.load(str(tiny_file), 2048, lambda _f: None)
        head = "word " * 900
        result = await worker.embed([head + "alpha beta gamma", head + "omega psi chi"], embedding_model=False)
        first, second = result["data"]
        assert first != second  # the ends differ only past token 512: both ends were embedded
        assert result["prompt_tokens"] > 1800
    finally:
        await worker.stop("done")


def _lone_continuation_byte_token(model: Path) -> int:
    """The id of the token that is the single byte 0x80 in a GPT-2 style byte-level vocabulary (SmolLM2's): on its
    own, never valid UTF-8."""
    from lmsd.gguf_header import read_header

    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    as_char = chr(256 + extra.index(0x80))
    tokens = read_header(model, keep_arrays=frozenset({"tokenizer.ggml.tokens"})).fields["tokenizer.ggml.tokens"]
    return tokens.index(as_char)


async def test_bytes_that_are_not_utf8_stream_as_replacement_characters_without_stalling_the_worker(
        tiny_file: Path) -> None:
    """llama-cpp-python held back undecodable bytes and then spent time proportional to the whole text on every
    further token, streaming nothing: with a client that forces such bytes (logit_bias) the worker spun for many
    minutes. Bytes that can never be UTF-8 now stream as U+FFFD (as llama-server does) at a token's cost, and
    the generation runs to its end."""
    token = _lone_continuation_byte_token(tiny_file)
    worker = await WorkerProcess.spawn()
    try:
        await worker.load(str(tiny_file), 2048, lambda f: None)
        for kind, params in (("completion", {"prompt": "Hello"}), ("chat", {"messages": [{"role": "user",
                                                                                          "content": "hi"}]})):
            text, done = await asyncio.wait_for(
                collect(worker, kind, {**params, "max_tokens": 1500, "logit_bias": {str(token): 100}}), 120)
            assert done["finish_reason"] == "length" and done["completion_tokens"] == 1500, done
            assert text == "\ufffd" * 1500
        text, done = await asyncio.wait_for(collect(worker, "completion", {"prompt": "Hello", "max_tokens": 4}), 30)
        assert done["completion_tokens"] >= 1
    finally:
        await worker.stop("test over")


async def test_a_context_llama_cpp_rounds_up_is_the_one_in_force_and_a_full_context_ends_with_length(
        tmp_path: Path, smollm2_file: Path) -> None:
    """llama.cpp rounds a context of 200 tokens up to 256 while llama-cpp-python sized its buffers for 200: a
    prompt of 220 tokens then failed with a 500 (found by schemathesis). The context in force is reported, and a
    generation that fills it ends with finish_reason "length"."""
    from tests.support.tinymodel import write_tiny_model

    model = write_tiny_model(tmp_path / "small.F16.gguf", smollm2_file, context_length=200)
    worker = await WorkerProcess.spawn()
    try:
        assert await worker.load(str(model), 200, lambda f: None) == 256
        text, done = await collect(worker, "completion", {"prompt": "hi " * 219})
        assert done["finish_reason"] == "length" and done["prompt_tokens"] + done["completion_tokens"] <= 256
    finally:
        await worker.stop("test over")


async def test_a_grammar_llama_cpp_refuses_is_a_clear_error_and_the_worker_lives(tiny_file: Path) -> None:
    """A schema whose grammar refers to itself first: llama.cpp returns no sampler and llama-cpp-python used the
    NULL anyway (the worker died with SIGSEGV)."""
    from lmsd.errors import InvalidArgument

    schema = {"definitions": {"a": {"anyOf": [{"$ref": "#/definitions/a"}, {"type": "string"}]}},
              "type": "object", "properties": {"x": {"$ref": "#/definitions/a"}}, "required": ["x"]}
    worker = await WorkerProcess.spawn()
    try:
        await worker.load(str(tiny_file), 256, lambda f: None)
        with pytest.raises(InvalidArgument, match="cannot use the grammar"):
            await collect(worker, "completion", {"prompt": "hi", "max_tokens": 4, "response_format": {
                "type": "json_schema", "json_schema": {"schema": schema}}})
        _text, done = await collect(worker, "completion", {"prompt": "hi", "max_tokens": 4})
        assert done["completion_tokens"] >= 1
    finally:
        await worker.stop("test over")
