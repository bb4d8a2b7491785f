"""End to end: the HTTP endpoint of the real lmsd, through the `openai` SDK and plain HTTP.

Models: `alpha` and `beta` are the tiny generated model (fast), `smollm2-135m-instruct` the real one (slow
enough, ~100 tokens/s on CPU, for generations that last seconds).
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.conftest import pid_alive, wait_until
from tests.e2e.conftest import Server

SMOL = "smollm2-135m-instruct"
HI = [{"role": "user", "content": "hi"}]


def chat(server: Server, model: str, **extra: Any) -> httpx.Response:
    with server.client() as c:
        return c.post("/v1/chat/completions", json={"model": model, "messages": HI, "max_tokens": 4, **extra})


def identifiers(server: Server) -> list[str]:
    return sorted(i["identifier"] for i in server.loaded())


def log_text(server: Server) -> str:
    return (server.home.root / "logs" / "lmsd.log").read_text()


# ---------------------------------------------------------------- the openai SDK


def test_openai_sdk_chat_stream_completions_embeddings(server: Server) -> None:
    client: Any = server.openai()
    models = [m.id for m in client.models.list()]
    assert models == ["alpha", "beta", SMOL]  # JIT on: every downloaded model

    reply = client.chat.completions.create(
        model=SMOL, temperature=0, max_tokens=20,
        messages=[{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in reply.choices[0].message.content  # greedy: the same answer every time
    assert reply.model == SMOL and reply.usage.completion_tokens >= 3
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    pieces, usage, finish = [], None, None
    stream = client.chat.completions.create(model="alpha", messages=HI, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert finish == "length" and "".join(pieces)
    assert usage is not None and usage.completion_tokens == 12 and usage.prompt_tokens > 5

    done = client.completions.create(model="beta", prompt="Once upon a time", max_tokens=7,
                                     extra_body={"ignore_eos": True})
    assert done.choices[0].text and done.usage.completion_tokens == 7 and done.choices[0].finish_reason == "length"

    emb = client.embeddings.create(model="alpha", input=["hello world", "goodbye"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 64  # the tiny model's width
    assert emb.data[0].embedding != emb.data[1].embedding and emb.usage.prompt_tokens > 0


def test_plain_http_stream_is_sse_ending_with_done(server: Server) -> None:
    with server.client() as c, c.stream("POST", "/v1/completions", json={
            "model": "alpha", "prompt": "a", "max_tokens": 5, "stream": True, "ignore_eos": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_lm_studio_v0_api(server: Server) -> None:
    with server.client() as c:
        models = c.get("/api/v0/models").json()["data"]
        smol = next(m for m in models if m["id"] == SMOL)
        assert smol == {"id": SMOL, "object": "model", "type": "llm", "publisher": "HuggingFaceTB", "arch": "llama",
                        "compatibility_type": "gguf", "quantization": "Q4_1", "state": "not-loaded",
                        "max_context_length": 8192}
        r = c.post("/api/v0/chat/completions", json={"model": SMOL, "messages": HI, "max_tokens": 5, "ttl": 60})
        body = r.json()
        assert r.status_code == 200, body
        assert set(body["stats"]) == {"tokens_per_second", "time_to_first_token", "generation_time", "stop_reason",
                                      "cached_prompt_tokens"}
        assert body["model_info"] == {"arch": "llama", "quant": "Q4_1", "format": "gguf", "context_length": 4096}
        assert body["runtime"]["name"] == "llama-cpp-python"
        one = c.get(f"/api/v0/models/{SMOL}").json()
        assert one["state"] == "loaded" and one["loaded_context_length"] == 4096 and one["parallel"] == 4
        # the same conversation again: its prompt comes from the prompt cache, and the stats say so
        again = c.post("/api/v0/chat/completions", json={"model": SMOL, "messages": HI, "max_tokens": 5}).json()
        prompt = again["usage"]["prompt_tokens"]
        assert again["stats"]["cached_prompt_tokens"] == prompt - 1  # the last prompt token is always read again
        assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": prompt - 1}
        assert c.get("/api/v0/models/nope").status_code == 404
        comp = c.post("/api/v0/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 3}).json()
        assert comp["stats"]["stop_reason"] in ("maxPredictedTokensReached", "eosFound")
        emb = c.post("/api/v0/embeddings", json={"model": "alpha", "input": "x"}).json()
        assert len(emb["data"][0]["embedding"]) == 64


# ---------------------------------------------------------------- lifecycle through HTTP


def test_jit_default_ttl_then_request_ttl_that_expires(server: Server) -> None:
    assert chat(server, "alpha").status_code == 200
    [inst] = server.loaded()
    assert (inst["identifier"], inst["origin"], inst["ttl_seconds"]) == ("alpha", "jit", 3600)
    assert chat(server, "alpha", ttl=2).status_code == 200  # loaded already: ttl accepted and ignored
    assert server.loaded()[0]["ttl_seconds"] == 3600

    assert chat(server, "beta", ttl=3).status_code == 200  # loads beta (evicting alpha) with ttl 3
    [beta] = server.loaded()
    assert (beta["identifier"], beta["ttl_seconds"]) == ("beta", 3)
    wait_until(lambda: server.loaded() == [], timeout=15, what="beta's 3 s TTL")
    assert not pid_alive(beta["pid"])
    assert "TTL of beta (3s) ran out" in log_text(server)


def test_steady_traffic_keeps_resetting_the_idle_timer(server: Server) -> None:
    assert chat(server, "alpha", ttl=3).status_code == 200
    pid = server.loaded()[0]["pid"]
    end = time.monotonic() + 7
    while time.monotonic() < end:  # a request every ~0.5 s for 7 s: longer than the TTL, never idle 3 s
        assert chat(server, "alpha").status_code == 200
        assert [i["pid"] for i in server.loaded()] == [pid]  # `lms ps` itself takes a few tenths of a second
        time.sleep(0.1)
    wait_until(lambda: server.loaded() == [], timeout=15, what="the TTL once traffic stops")


def test_auto_evict_replaces_jit_models_but_never_manual(server: Server) -> None:
    server.lms("load", "beta", "--identifier", "pinned", check=True)
    assert chat(server, "alpha").status_code == 200
    assert identifiers(server) == ["alpha", "pinned"]
    assert chat(server, SMOL).status_code == 200  # JIT: alpha is evicted, the manual one stays
    assert identifiers(server) == ["pinned", SMOL]
    assert "unloaded alpha (reason: evict)" in log_text(server)
    assert chat(server, "pinned").status_code == 200  # a manual instance serves by its identifier

    server.lms("server", "settings", "--no-auto-evict", check=True)
    assert chat(server, "alpha").status_code == 200
    assert identifiers(server) == ["alpha", "pinned", SMOL]


def test_jit_off(server: Server) -> None:
    server.lms("server", "settings", "--no-jit", check=True)
    r = chat(server, "alpha")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and "lms load alpha" in err["message"]
    with server.client() as c:
        assert c.get("/v1/models").json()["data"] == []
    server.lms("load", "alpha", check=True)
    with server.client() as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["alpha"]
    assert chat(server, "alpha").status_code == 200
    assert identifiers(server) == ["alpha"]


def test_six_concurrent_first_requests_make_one_instance(server: Server) -> None:
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: chat(server, SMOL).status_code, range(6)))
    assert codes == [200] * 6
    assert identifiers(server) == [SMOL]
    assert log_text(server).count(f"loaded {SMOL} ") == 1


def test_eviction_waits_for_a_running_stream_to_finish(server: Server) -> None:
    client: Any = server.openai()
    stream = client.chat.completions.create(model=SMOL, messages=HI, max_tokens=400, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    pieces, usage, finish = [], None, None
    b_result: dict[str, Any] = {}

    def request_b() -> None:
        b_result["response"] = chat(server, "alpha")
        b_result["at"] = time.monotonic()

    thread = threading.Thread(target=request_b)
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
        if len(pieces) == 10:
            thread.start()  # B arrives while A is mid-stream: A must drain, not die
            wait_until(lambda: any(i["status"] == "unloading" for i in server.loaded()), timeout=10,
                       what="A to start draining")
    a_done = time.monotonic()
    thread.join(60)
    assert finish == "length" and usage is not None and usage.completion_tokens == 400
    assert b_result["response"].status_code == 200 and b_result["at"] >= a_done
    assert identifiers(server) == ["alpha"]


def test_short_ttl_never_fires_during_a_long_generation(server: Server) -> None:
    started = time.monotonic()
    checked, usage = False, None
    body = {"model": SMOL, "messages": HI, "max_tokens": 400, "ttl": 1, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    with server.client() as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            usage = json.loads(line[6:]).get("usage") or usage
            if not checked and time.monotonic() - started > 1.5:  # past the TTL, mid-generation
                [inst] = server.loaded()
                assert (inst["status"], inst["ttl_seconds"]) == ("busy", 1)
                checked = True
    assert checked, "the generation ended before it outlasted the TTL"
    assert usage is not None and usage["completion_tokens"] == 400
    assert "TTL of smollm2-135m-instruct (1s) ran out" not in log_text(server)
    wait_until(lambda: server.loaded() == [], timeout=10, what="the 1 s TTL after the generation")


def test_client_disconnect_stops_generation_and_frees_the_instance(server: Server) -> None:
    received = 0
    with server.client() as c, c.stream("POST", "/v1/chat/completions", json={
            "model": SMOL, "messages": HI, "max_tokens": 3000, "stream": True, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                received += 1
            if received == 5:
                break
    wait_until(lambda: server.loaded()[0]["status"] == "idle", timeout=5, what="the instance to be idle")
    line = wait_until(lambda: re.search(r"request /v1/chat/completions smollm2-135m-instruct: client disconnected, "
                                        r"\d+ in / (\d+) out", log_text(server)), timeout=5)
    assert int(line.group(1)) < 60, line.group(0)  # stopped within a few tokens, not 3000
    assert chat(server, SMOL).status_code == 200  # and the instance serves the next request


def test_queue_full_answers_429_with_retry_after(home: Any, lms: Any, tiny_file: Any, smollm2_file: Any) -> None:
    from tests.conftest import SMOLLM2_DEST
    from tests.e2e.conftest import free_port

    home.add(smollm2_file, SMOLLM2_DEST)
    env = {**home.env, "LMS_MAX_QUEUE": "1"}
    lms("daemon", "up", env=env, check=True)
    port = free_port()
    lms("server", "start", "--port", str(port), check=True)
    server = Server(home, lms, f"http://127.0.0.1:{port}")
    server.lms("load", SMOL, "--parallel", "1", check=True)  # one at a time: the second request queues
    assert server.loaded()[0]["parallel"] == 1
    long = {"max_tokens": 400, "ignore_eos": True}
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(chat, server, SMOL, **long)
        wait_until(lambda: server.loaded()[0]["in_flight"] == 1, what="the first request to run")
        queued = pool.submit(chat, server, SMOL, **long)
        wait_until(lambda: server.loaded()[0]["queued"] == 1, what="the second request to queue")
        refused = chat(server, SMOL)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        assert running.result().status_code == 200 and queued.result().status_code == 200


# ---------------------------------------------------------------- bad input


BAD_REQUESTS: list[tuple[str, Any, int, str | None]] = [
    ("malformed json", b"{not json", 400, None),
    ("messages not a list", {"model": "alpha", "messages": "hi"}, 400, "messages"),
    ("messages empty", {"model": "alpha", "messages": []}, 400, "messages"),
    ("unknown role", {"model": "alpha", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("missing model", {"messages": HI}, 400, "model"),
    ("unknown model", {"model": "no-such-model", "messages": HI}, 404, "model"),
    ("path-like model", {"model": "../../etc/passwd", "messages": HI}, 400, "model"),
    ("ttl -1", {"model": "alpha", "messages": HI, "ttl": -1}, 400, "ttl"),
    ("ttl 0", {"model": "alpha", "messages": HI, "ttl": 0}, 400, "ttl"),
    ("ttl string", {"model": "alpha", "messages": HI, "ttl": "abc"}, 400, "ttl"),
    ("ttl float", {"model": "alpha", "messages": HI, "ttl": 1.5}, 400, "ttl"),
    ("ttl huge", {"model": "alpha", "messages": HI, "ttl": 10**12}, 400, "ttl"),
    ("max_tokens negative", {"model": "alpha", "messages": HI, "max_tokens": -5}, 400, "max_tokens"),
    ("max_tokens beyond context", {"model": "alpha", "messages": HI, "max_tokens": 10**6}, 400, "max_tokens"),
    ("n > 1", {"model": "alpha", "messages": HI, "n": 2}, 400, "n"),
    ("seed out of range", {"model": "alpha", "messages": HI, "seed": 2**40}, 400, "seed"),
    ("temperature a string", {"model": "alpha", "messages": HI, "temperature": "hot"}, 400, "temperature"),
    ("image content", {"model": "alpha", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages.0.content"),
    ("model name of 100 kB", {"model": "a" * 100_000, "messages": HI}, 400, "model"),
    ("NaN literal", b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "top_p": NaN}', 400, None),
    ("Infinity literal", b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], '
                         b'"repeat_penalty": Infinity}', 400, None),
    ("repeat_penalty huge", {"model": "alpha", "messages": HI, "repeat_penalty": 1e300}, 400, "repeat_penalty"),
    ("logit_bias of 100k entries", {"model": "alpha", "messages": HI,
                                    "logit_bias": {str(i): 1 for i in range(100_000)}}, 400, "logit_bias"),
    ("logit_bias value huge", {"model": "alpha", "messages": HI, "logit_bias": {"5": 1e308}}, 400, "logit_bias"),
    ("JSON nested 100k deep", b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("logit_bias value a boolean", {"model": "alpha", "messages": HI, "logit_bias": {"0": False}}, 400,
     "logit_bias.0"),
    ("lone surrogate", b'{"model": "alpha", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, None),
    ("raw surrogate bytes", b'{"model": "alpha", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}', 400,
     None),
    ("pattern that expands to 5,000 rules", {"model": "alpha", "messages": HI, "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "^a{0,5000}$"}}}}, 400,
     "response_format"),
    ("nested pattern counts", {"model": "alpha", "messages": HI, "response_format": {
        "type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "^(a{0,256}){0,256}$"}}}},
     400, "response_format"),
]


def test_bad_requests_get_clear_errors_and_load_nothing(server: Server) -> None:
    with server.client() as c:
        for name, body, status, param in BAD_REQUESTS:
            kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = c.post("/v1/chat/completions", headers={"content-type": "application/json"}, **kwargs)
            assert r.status_code == status, (name, r.text)
            err = r.json()["error"]
            assert err["message"] and err["type"] and err["param"] == param, (name, err)
        for path, body, param in (("/v1/completions", {"model": "alpha", "prompt": ""}, "prompt"),
                                  ("/v1/completions", {"model": "alpha", "prompt": [""]}, "prompt"),
                                  ("/v1/embeddings", {"model": "alpha", "input": ""}, "input"),
                                  ("/v1/embeddings", {"model": "alpha", "input": ["a", ""]}, "input")):
            r = c.post(path, json=body)  # found by a fuzzer: these were 500s
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        big = c.post("/v1/chat/completions", content=b"x" * (50 * 1024 * 1024))
        assert big.status_code == 413 and "larger than the limit" in big.json()["error"]["message"]
        assert c.get("/v1/models").status_code == 200  # still answering
    assert server.loaded() == []  # no bad request caused a JIT load


def test_prompt_longer_than_context_is_400(server: Server) -> None:
    server.lms("load", "alpha", "--context-length", "256", check=True)
    with server.client() as c:
        r = c.post("/v1/completions", json={"model": "alpha", "prompt": "hello " * 1000, "max_tokens": 4})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "context length of 256" in err["message"]
    assert chat(server, "alpha").status_code == 200  # the daemon and the instance carry on


# ---------------------------------------------------------------- server commands, API key, log stream


def test_server_status_stop_start_and_restart_memory(server: Server) -> None:
    status = server.lms.json("server", "status")
    assert status["running"] is True and status["url"] == server.url and status["bind"] == "127.0.0.1"
    assert server.lms.json("daemon", "status")["http"] == status
    server.lms("server", "stop", check=True)
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/v1/models")
    assert server.lms.json("server", "status")["running"] is False
    server.lms("server", "start", check=True)  # the remembered port
    assert httpx.get(server.url + "/v1/models").status_code == 200
    server.lms("daemon", "down", check=True)
    server.lms("daemon", "up", check=True)  # the endpoint comes back with the daemon
    assert httpx.get(server.url + "/v1/models").status_code == 200
    port = int(server.url.rsplit(":", 1)[1])
    other = httpx.Client()
    try:
        restarted = server.lms("server", "start", "--port", str(port), "--cors")  # new options, same port
        assert restarted.returncode == 0, restarted.stderr
        preflight = {"Origin": "http://x", "Access-Control-Request-Method": "GET"}
        r = other.options(server.url + "/v1/models", headers=preflight)
        assert r.headers.get("access-control-allow-origin") == "*"
    finally:
        other.close()


def test_port_in_use_is_a_clear_error(server: Server) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = server.lms("server", "start", "--port", str(port))
    assert out.returncode == 1 and f"port {port} on 127.0.0.1 is already in use" in out.stderr
    # The endpoint that was running keeps serving on its old port, and the failed port was not saved.
    with server.client() as c:
        assert c.get("/v1/models").status_code == 200
    assert server.lms.json("server", "status")["port"] == int(server.url.rsplit(":", 1)[1])
    assert server.lms.json("server", "settings")["port"] != port


def test_web_pages_cannot_use_the_endpoint_unless_cors_allows_them(server: Server) -> None:
    body = json.dumps({"model": "alpha", "messages": HI, "max_tokens": 2})
    with server.client() as c:
        # A page's "simple request": text/plain, no preflight. Refused before any work.
        r = c.post("/v1/chat/completions", content=body,
                   headers={"Content-Type": "text/plain", "Origin": "https://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert "CORS is off" in r.json()["error"]["message"]
        # DNS rebinding: a foreign Host while bound to loopback.
        r = c.get("/v1/models", headers={"Host": "evil.example:1234"})
        assert r.status_code == 403 and "DNS rebinding" in r.json()["error"]["message"]
        for host in ("localhost:1", "127.0.0.1", "[::1]:8080"):
            assert c.get("/v1/models", headers={"Host": host}).status_code == 200, host
        # Clients that send no Origin keep working, whatever the content type (curl -d's default included).
        r = c.post("/v1/chat/completions", content=body,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200, r.text
    assert identifiers(server) == ["alpha"]  # loaded by the last request only
    port = int(server.url.rsplit(":", 1)[1])
    server.lms("server", "start", "--port", str(port), "--cors", check=True)
    with server.client() as c:
        r = c.post("/v1/chat/completions", content=body,
                   headers={"Content-Type": "text/plain", "Origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


def test_api_key(server: Server) -> None:
    secret = "s3cret-key-123"
    import subprocess

    proc = subprocess.run([server.lms.exe, "server", "settings", "--api-key-set"], input=secret + "\n",
                          env=server.home.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert server.lms.json("server", "settings")["api_key_set"] is True
    assert re.search(r"api_key\s+set\b", server.lms("server", "settings", check=True).stdout)  # in the table too
    key_file = server.home.root / "api_key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    with server.client() as c:
        missing = c.get("/v1/models")
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
    client: Any = server.openai(api_key=secret)
    assert client.chat.completions.create(model="alpha", messages=HI, max_tokens=2).choices
    assert secret not in log_text(server) and secret not in (server.home.root / "settings.json").read_text()
    server.lms("server", "settings", "--api-key-clear", check=True)
    assert httpx.get(server.url + "/v1/models").status_code == 200


def test_log_stream_follows_loads_requests_and_unloads(server: Server) -> None:
    import subprocess

    proc = subprocess.Popen([server.lms.exe, "log", "stream", "--json"], env=server.home.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # let the watcher subscribe before the events happen
        assert chat(server, "alpha", ttl=1).status_code == 200
        wait_until(lambda: server.loaded() == [], timeout=15, what="the TTL")
        events = []
        while len(events) < 3:
            events.append(json.loads(proc.stdout.readline()))  # type: ignore[union-attr]
        server.lms("daemon", "down", check=True)
        assert proc.wait(20) == 3  # the stream ends, and says why, when the daemon stops
        assert "lmsd stopped; the event stream ended" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
    kinds = [(e["kind"], e.get("reason")) for e in events]
    assert kinds == [("loaded", None), ("request", None), ("unloaded", "ttl")]
    req = events[1]
    assert req["identifier"] == "alpha" and req["status"] == "ok" and req["completion_tokens"] > 0
    assert isinstance(req["completion_tokens"], int) and isinstance(req["tokens_per_second"], float)
    assert req["tokens_per_second"] > 0 and events[0]["context_length"] > 0


def test_log_stream_filters_and_shows_refused_requests_settings_and_the_endpoint(server: Server) -> None:
    import subprocess

    proc = subprocess.Popen([server.lms.exe, "log", "stream", "--json", "--filter", "request,settings,server"],
                            env=server.home.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # let the watcher subscribe before the events happen
        with server.client() as c:
            assert c.post("/v1/chat/completions", json={"model": "alpha"}).status_code == 400  # no messages
        server.lms("load", "alpha", check=True)  # filtered out: a load
        server.lms("server", "settings", "--no-jit", check=True)
        server.lms("server", "settings", "--api-key-clear", check=True)
        server.lms("server", "stop", check=True)
        events = [json.loads(proc.stdout.readline()) for _ in range(4)]  # type: ignore[union-attr]
    finally:
        proc.terminate()
        proc.wait(10)
    assert [e["kind"] for e in events] == ["request", "settings", "settings", "server"], events
    refused = events[0]
    assert refused["endpoint"] == "/v1/chat/completions" and refused["http_status"] == 400
    assert refused["status"].startswith("error: messages")
    assert events[1]["jit"] is False and events[1]["message"] == "jit=false"
    assert events[2]["api_key"] == "cleared"
    assert events[3]["message"] == "HTTP endpoint stopped"
    bad = server.lms("log", "stream", "--filter", "loads")
    assert bad.returncode == 2 and "--filter takes load, unload, request" in bad.stderr


def test_json_mode_constrains_the_output(server: Server) -> None:
    # The tiny model writes random words; under response_format the grammar forces JSON from the first token.
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "alpha", "messages": HI, "max_tokens": 24,
                                                 "response_format": {"type": "json_object"}})
        free = c.post("/v1/chat/completions", json={"model": "alpha", "messages": HI, "max_tokens": 24})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].lstrip().startswith("{")
    assert not free.json()["choices"][0]["message"]["content"].lstrip().startswith("{")


def test_json_schemas_that_would_sink_a_worker_are_refused(server: Server) -> None:
    def schema(s: dict) -> dict:
        return {"model": "alpha", "messages": HI, "max_tokens": 4,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}}

    with server.client() as c:
        huge = c.post("/v1/chat/completions", json=schema({"type": "array", "maxItems": 1_000_000_000}))
        remote = c.post("/v1/chat/completions", json=schema({"$ref": "https://evil.example/schema.json"}))
        broken = c.post("/v1/chat/completions", json=schema({"$ref": "#/definitions/missing"}))
        fine = c.post("/v1/chat/completions", json=schema({"type": "object", "properties": {
            "a": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}}}))
    assert huge.status_code == 400 and "maxItems" in huge.json()["error"]["message"]
    assert remote.status_code == 400 and "local references" in remote.json()["error"]["message"]
    assert broken.status_code == 400, broken.text  # llama-cpp cannot compile it: the client's mistake, not a 500
    assert broken.json()["error"]["code"] == "invalid_request_error"
    assert fine.status_code == 200, fine.text


def test_worker_crash_mid_request_is_500_and_the_daemon_carries_on(server: Server) -> None:
    import os
    import signal

    long = {"max_tokens": 3000, "ignore_eos": True}
    with ThreadPoolExecutor(2) as pool:
        plain = pool.submit(chat, server, SMOL, **long)
        [inst] = wait_until(lambda: [i for i in server.loaded() if i["in_flight"] == 1], what="a running request")
        os.kill(inst["pid"], signal.SIGKILL)
        r = plain.result()
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "worker_gone" and "SIGKILL" in err["message"]

    client: Any = server.openai()
    stream = client.chat.completions.create(model=SMOL, messages=HI, stream=True, max_tokens=3000,
                                            extra_body={"ignore_eos": True})
    import openai

    with pytest.raises(openai.APIError, match="SIGKILL"):
        for n, _chunk in enumerate(stream):
            if n == 3:
                os.kill(server.loaded()[0]["pid"], signal.SIGKILL)
    assert chat(server, SMOL).status_code == 200  # loaded afresh, just in time
    assert server.lms("daemon", "status").returncode == 0


def test_unload_lets_a_request_finish_within_grace_then_ends_it_clearly(server: Server) -> None:
    server.lms("load", SMOL, check=True)
    with ThreadPoolExecutor(1) as pool:
        short = pool.submit(chat, server, SMOL, max_tokens=250, ignore_eos=True)
        wait_until(lambda: server.loaded()[0]["in_flight"] == 1, what="the request to run")
        server.lms("unload", SMOL, "--grace", "30", check=True)  # waits for the request, which finishes
        assert short.result().status_code == 200
        assert short.result().json()["usage"]["completion_tokens"] == 250

        server.lms("load", SMOL, check=True)
        endless = pool.submit(chat, server, SMOL, max_tokens=3000, ignore_eos=True)
        wait_until(lambda: server.loaded()[0]["in_flight"] == 1, what="the request to run")
        server.lms("unload", SMOL, "--grace", "1", check=True)
        r = endless.result()
    assert r.status_code == 503
    assert "unloaded (lms unload) after a grace period of 1.0s" in r.json()["error"]["message"]
    assert server.loaded() == []


def test_logit_bias_and_stop_are_applied(server: Server) -> None:
    with server.client() as c, c.stream("POST", "/v1/completions", json={
            "model": "alpha", "prompt": "a", "max_tokens": 4, "stream": True, "logit_bias": {"1000": 100}}) as r:
        texts = [json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                 if line.startswith("data: {")]
    pieces = [t for t in texts if t]
    assert len(pieces) == 4 and len(set(pieces)) == 1  # the biased token, every time
    with server.client() as c:
        stopped = c.post("/v1/completions", json={"model": "alpha", "prompt": "a", "max_tokens": 4,
                                                  "logit_bias": {"1000": 100}, "stop": [pieces[0].strip()]}).json()
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["choices"][0]["text"].strip() == ""
