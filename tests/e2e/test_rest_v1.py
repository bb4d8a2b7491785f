"""LM Studio's REST API v1 (load, unload, list) and /health on the real daemon, over plain HTTP."""

from __future__ import annotations

import time

from tests.conftest import wait_until
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


def test_a_client_that_leaves_during_a_load_withdraws_it(server: Server) -> None:
    import json
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server.url)
    body = json.dumps({"model": "smollm2-135m-instruct", "identifier": "abandoned"}).encode()
    sock = socket.create_connection((url.hostname, url.port))
    sock.sendall(b"POST /api/v1/models/load HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_until(lambda: [i["identifier"] for i in server.loaded()] == ["abandoned"], timeout=30,
               what="the load to start")
    sock.close()  # the client leaves while the model loads
    wait_until(lambda: server.loaded() == [], timeout=30, what="the abandoned load to be withdrawn")
