"""End to end: several `openai` clients on one model of the real lmsd, decoded together (continuous batching)."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.conftest import wait_until
from tests.e2e.conftest import Server

SMOL = "smollm2-135m-instruct"
QUESTIONS = ["Name a fruit.", "Name a river.", "Name a planet.", "Name a color."]


def test_four_openai_clients_on_one_model_stream_together_and_one_leaving_spares_the_rest(server: Server) -> None:
    out = server.lms("load", SMOL, check=True)  # default_parallel: 4
    header, row = server.lms("ps", check=True).stdout.splitlines()[:2]
    column = header.index("PARALLEL")
    assert row[column:].split()[0] == "4"
    client: Any = server.openai()
    all_started = threading.Barrier(5)
    first_at: dict[int, float] = {}
    last_at: dict[int, float] = {}
    usage: dict[int, Any] = {}

    def stream(n: int) -> None:
        leaves = n == 3
        chunks = client.chat.completions.create(
            model=SMOL, messages=[{"role": "user", "content": QUESTIONS[n]}], max_tokens=150, temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        count = 0
        for chunk in chunks:
            if chunk.usage:
                usage[n] = chunk.usage
            if any(c.delta.content for c in chunk.choices):
                count += 1
                if count == 1:
                    first_at[n] = time.monotonic()
                    all_started.wait(60)
                if leaves and count == 5:
                    chunks.close()  # this client goes away mid-stream
                    return
        last_at[n] = time.monotonic()

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream, n) for n in range(4)]
        all_started.wait(60)  # every client has its first token: they run together
        assert server.loaded()[0]["in_flight"] >= 3
        for f in futures:
            f.result()
    assert max(first_at.values()) < min(last_at.values()), "a client waited for another one to finish"
    for n in range(3):
        assert usage[n].completion_tokens == 150  # exact, and the leaver cut none of them short
    wait_until(lambda: re.search(rf"request /v1/chat/completions {SMOL}: client disconnected",
                                 (server.home.root / "logs" / "lmsd.log").read_text()), timeout=10)
    assert "Loaded" in out.stderr


def test_default_parallel_applies_to_jit_loads_and_a_load_can_say_otherwise(server: Server) -> None:
    server.lms("server", "settings", "--default-parallel", "2", check=True)
    with server.client() as c:
        assert c.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2}).status_code == 200
        server.lms("load", "beta", "--parallel", "6", check=True)
        by_id = {i["identifier"]: i for i in server.loaded()}
        assert by_id["alpha"]["parallel"] == 2 and by_id["beta"]["parallel"] == 6
        models = {m["id"]: m for m in c.get("/api/v0/models").json()["data"]}
        assert models["alpha"]["parallel"] == 2 and models["beta"]["parallel"] == 6
    bad = server.lms("load", "beta", "--parallel", "0")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
