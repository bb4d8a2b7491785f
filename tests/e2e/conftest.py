from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import SMOLLM2_DEST, Home, Lms


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    home: Home
    lms: Lms
    url: str  # http://127.0.0.1:PORT

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)  # type: ignore[arg-type]

    def openai(self, api_key: str = "not-needed") -> object:
        import openai

        return openai.OpenAI(base_url=self.v1, api_key=api_key, max_retries=0, timeout=120)

    def loaded(self) -> list[dict]:
        return self.lms.json("ps")


@pytest.fixture
def server(home: Home, lms: Lms, tiny_file: Path, smollm2_file: Path) -> Iterator[Server]:
    """A running lmsd with its HTTP endpoint on a free port, and three models: two tiny ones and SmolLM2."""
    home.add(tiny_file, "test/alpha/alpha.F16.gguf")
    home.add(tiny_file, "test/beta/beta.F16.gguf")
    home.add(smollm2_file, SMOLLM2_DEST)
    port = free_port()
    lms("server", "start", "--port", str(port), check=True)
    yield Server(home, lms, f"http://127.0.0.1:{port}")
