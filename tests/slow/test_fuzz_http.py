"""schemathesis against the endpoint's own OpenAPI schema: every operation, positive and negative data.

The run uses the real daemon and real llama.cpp inference on two tiny models with a 128-token context (JIT
loads and auto-evict swaps happen under the fuzzer; llama.cpp rounds the context up to 256, and a generation
ends within it). The only change to the served schema: `model` (and the model in /api/v0/models/{model}) is
narrowed to the models that exist, so positive cases reach inference instead of stopping at 404; negative
cases still send any name.

Checks: no 5xx; no hang (each request within 60 s); every status and content type declared; every error in
OpenAI's `{"error": {...}}` shape (the schema declares it); negative data is refused.
The example count per operation is LMS_FUZZ_EXAMPLES (CI 8; `make stress` 100).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Home, Lms
from tests.e2e.conftest import Server, free_port
from tests.support.stress import write_figures
from tests.support.tinymodel import write_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SECRET = "fuzz-key-0123456789"
EXAMPLES = int(os.environ.get("LMS_FUZZ_EXAMPLES", "8"))
MODELS = ["alpha", "beta"]


def narrow_models(schema: dict[str, Any]) -> dict[str, Any]:
    for name in ("ChatRequest", "CompletionRequest", "EmbeddingRequest", "ResponsesRequest", "MessagesRequest"):
        schema["components"]["schemas"][name]["properties"]["model"] = {"type": "string", "enum": MODELS}
    for param in schema["paths"]["/api/v0/models/{model}"]["get"]["parameters"]:
        param["schema"] = {"type": "string", "enum": MODELS}
    return schema


@pytest.fixture
def server(home: Home, lms: Lms, smollm2_file: Path, tmp_path: Path) -> Server:
    """Two tiny models with a 128-token context: positive cases that ask for no max_tokens end within it."""
    small = write_tiny_model(tmp_path / "small-ctx.F16.gguf", smollm2_file, context_length=128)
    for key in MODELS:
        home.add(small, f"test/{key}/{key}.F16.gguf")
    port = free_port()
    lms("server", "start", "--port", str(port), check=True)
    return Server(home, lms, f"http://127.0.0.1:{port}")


def test_schemathesis_finds_no_server_error_no_hang_and_only_openai_shaped_errors(server: Server,
                                                                                   tmp_path: Path) -> None:
    proc = subprocess.run([server.lms.exe, "server", "settings", "--api-key-set"], input=SECRET + "\n",
                          env=server.home.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    auth = {"Authorization": f"Bearer {SECRET}"}
    assert httpx.get(server.url + "/openapi.json").status_code == 401  # the description is behind the key too
    schema = httpx.get(server.url + "/openapi.json", headers=auth).json()
    posted = {path for path, ops in schema["paths"].items() if "post" in ops}
    # completions, chat completions and embeddings on /v1 and /api/v0, REST v1's load and unload, Responses and
    # Messages
    assert all("requestBody" in schema["paths"][p]["post"] for p in posted) and len(posted) == 10
    spec = tmp_path / "openapi.json"
    spec.write_text(json.dumps(narrow_models(schema)))
    report = tmp_path / "report.json"
    st = Path(sys.executable).parent / "st"
    run = subprocess.run(
        [str(st), "run", str(spec), "--url", server.url, "-H", f"Authorization: Bearer {SECRET}",
         "--mode", "all", "--max-examples", str(EXAMPLES), "--workers", "1", "--seed", "1",
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                     "response_schema_conformance,negative_data_rejection",
         "--request-timeout", "60", "--max-response-time", "60", "--suppress-health-check", "all",
         "--phases", "examples,coverage,fuzzing", "--no-color", "--generation-database", "none", "--report", "junit",
         "--report-junit-path", str(report)],
        capture_output=True, text=True, timeout=1500, cwd=tmp_path,  # its cache (.schemathesis/) goes there
    )
    print(run.stdout[-4000:])
    assert run.returncode == 0, f"schemathesis found problems:\n{run.stdout[-60000:]}\n{run.stderr[-3000:]}"
    cases = re.search(r"(\d+) generated", run.stdout)
    assert cases and int(cases.group(1)) > 100, run.stdout[-3000:]
    write_figures("fuzz", {"examples_per_operation": EXAMPLES, "cases": int(cases.group(1)), "failures": 0})
