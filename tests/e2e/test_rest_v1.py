"""LM Studio's REST API v1 (load, unload, list), /health and /metrics on the real daemon, over plain HTTP."""

from __future__ import annotations

import time

import httpx

from tests.e2e.conftest import Server


def test_load_list_and_unload_over_http_as_lms_load_and_unload_do(server: Server) -> None:
    with server.client() as c:
        r = c.post("/api/v1/models/load", json={"model": "alpha", "config": {"context_length": 512}, "ttl": 600,
                                                 "identifier": "mine", "parallel": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_instance_id"] == "mine" and body["type"] == "llm"
        assert body["config"] == {"context_length": 512, "parallel": 2} and body["ttl_seconds"] == 600
        assert body["load_time_seconds"] > 0
        [ps] = server.loaded()
        assert (ps["identifier"], ps["origin"], ps["context_length"], ps["parallel"]) == ("mine", "manual", 512, 2)
        assert "mine" in [m["id"] for m in c.get("/v1/models").json()["data"]]
        by_identifier = c.get("/api/v0/models/mine")  # what /v1/models lists, /api/v0/models/{id} answers
        assert by_identifier.status_code == 200 and by_identifier.json()["id"] == "alpha"

        models = {m["key"]: m for m in c.get("/api/v1/models").json()["models"]}
        assert models["alpha"]["loaded_instances"] == [
            {"id": "mine", "config": {"context_length": 512, "parallel": 2}, "ttl_seconds": 600}]
        assert models["beta"]["loaded_instances"] == [] and models["beta"]["format"] == "gguf"
        assert models["smollm2-135m-instruct"]["quantization"] == {"name": "Q4_1", "bits_per_weight": 4.0}
        assert models["smollm2-135m-instruct"]["params_string"] == "134.5M"

        again = c.post("/api/v1/models/load", json={"model": "alpha", "identifier": "mine"})
        assert again.status_code == 409 or again.status_code == 400, again.text
        assert "already loaded" in again.json()["error"]["message"]

        r = c.post("/api/v1/models/unload", json={"instance_id": "mine"})
        assert r.status_code == 200 and r.json() == {"instance_id": "mine"}
        assert server.loaded() == []

        missing = c.post("/api/v1/models/unload", json={"instance_id": "mine"})
        assert missing.status_code == 404 and "no loaded instance 'mine'" in missing.json()["error"]["message"]
        unknown = c.post("/api/v1/models/load", json={"model": "no-such-model"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
        bad = c.post("/api/v1/models/load", json={"model": "alpha", "ttl": 0})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "ttl"


def test_health_and_listings_never_keep_a_model_loaded(server: Server) -> None:
    """Monitors poll /health and the listings all day: that must not count as use, or the TTL never ends."""
    with server.client() as c:
        assert c.post("/api/v1/models/load", json={"model": "alpha", "ttl": 2}).status_code == 200
        deadline = time.monotonic() + 20
        while server.loaded() and time.monotonic() < deadline:
            for path in ("/health", "/api/v1/models", "/v1/models", "/api/v0/models", "/api/v0/models/alpha"):
                assert c.get(path).status_code == 200, path
            time.sleep(0.2)
        assert server.loaded() == [], "polling kept the model loaded past its 2 s TTL"
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["loaded"] == 0


def test_metrics_count_requests_tokens_and_loads_in_prometheus_format(server: Server) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def scrape(c: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(r.text) for s in fam.samples}

    with server.client() as c:
        ok = c.post("/v1/chat/completions", json={"model": "alpha", "max_tokens": 5, "ttl": 600,
                                                  "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200
        assert c.post("/v1/chat/completions", json={"model": "made-up-name", "messages": [
            {"role": "user", "content": "hi"}]}).status_code == 404
        got = scrape(c)
    chat = (("endpoint", "/v1/chat/completions"), ("model", "alpha"), ("outcome", "ok"))
    assert got[("lms_requests_total", chat)] == 1
    assert got[("lms_generated_tokens_total", (("model", "alpha"),))] == ok.json()["usage"]["completion_tokens"]
    assert got[("lms_prompt_tokens_total", (("model", "alpha"),))] == ok.json()["usage"]["prompt_tokens"]
    assert got[("lms_time_to_first_token_seconds_count", (("model", "alpha"),))] == 1
    assert got[("lms_loads_total", (("model", "alpha"), ("origin", "jit"), ("result", "ok")))] == 1
    assert got[("lms_loaded_instances", (("origin", "jit"),))] == 1
    assert got[("lms_worker_memory_bytes", (("identifier", "alpha"), ("model", "alpha")))] > 0
    refused = (("endpoint", "/v1/chat/completions"), ("model", ""), ("outcome", "error"))
    assert got[("lms_requests_total", refused)] == 1  # a name a client made up is no label of its own

    import subprocess

    secret = "metrics-key-123"
    subprocess.run([server.lms.exe, "server", "settings", "--api-key-set"], input=secret + "\n",
                   env=server.home.env, capture_output=True, text=True, timeout=60, check=True)
    with server.client() as c:
        assert c.get("/metrics").status_code == 401  # behind the API key, like every route
        assert c.get("/metrics", headers={"Authorization": f"Bearer {secret}"}).status_code == 200
