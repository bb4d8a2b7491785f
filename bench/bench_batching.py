"""Continuous batching and prompt cache benchmark: lmsd against llama.cpp's own servers, one interleaved run.

Contenders, all loaded at once (an idle one costs no CPU) and measured round-robin, so the machine's ups and
downs fall on all of them alike; the order rotates every round:
  - lmsd over HTTP (own LMS_HOME under /tmp; the model loaded with `lms load --parallel P -c 4096`,
    P = the largest concurrency)
  - in-process llama-cpp-python (create_completion(stream=True)): single stream only, it cannot batch
  - llama-cpp-python's server (python -m llama_cpp.server), when installed: single stream only, it serves one
    request at a time and by default interrupts a running stream when another request comes
  - llama.cpp's llama-server (-np P --kv-unified -c 4096, continuous batching), when `make llama-server`
    has built it from the llama.cpp that the pinned llama-cpp-python vendors

Every generation: SmolLM2-135M-Instruct Q4_1, temperature 0, EOS ignored, streamed; the HTTP contenders share
one httpx SSE client (/v1/completions, /v1/chat/completions for the chat turns). A generation that produced
fewer tokens than asked (usage.completion_tokens, or the streamed pieces where a server reports no usage) or
did not end with finish_reason "length" stops the benchmark. Timings are taken at the client.

Measures (medians of the rounds):
  - single stream: TTFT (request sent to first streamed token) and decode tokens/s (after the first token)
    Outside the chat measure every prompt starts with a random number, so no contender serves it from a
    prompt cache: TTFT includes reading the whole (~25-token) prompt.
  - C concurrent streaming clients (C = 1, 2, 4, 8; all released together, each with its own prompt):
    aggregate tokens/s = all tokens / (first request sent .. last token received), and the clients' TTFT p50;
    C = 1 is the single-stream run
  - prompt cache: a two-turn chat whose first turn (system + user) is ~1,000 tokens; the second turn sends the
    same history + the assistant's reply + a new user message. TTFT of the second turn against the first
    (lmsd and llama-server, which gets `cache_prompt: true`). Every round starts a new conversation (a fresh
    first line), so its first turn is never served from a cache.

Run: `make bench` (after bench_http.py), or python bench/bench_batching.py [--rounds N] [--quick].
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_http import free_port, physical_cores  # noqa: E402 - after the path is set

MODEL_KEY = "smollm2-135m-instruct"
N_CTX = 4096
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
CLIENT_PROMPTS = [  # one per concurrent client, so no two streams share a prompt
    PROMPT,
    "Write a short story about a baker who wakes up one morning able to hear what bread is thinking.",
    "Describe, step by step, how a small mountain village prepares for its first winter festival.",
    "Tell the story of a cartographer who is asked to map an island that moves every night.",
    "Write a letter from a retired astronaut to her grandson about the first time she saw the Earth.",
    "Explain to a curious child how a river carves a canyon over millions of years.",
    "Write a short story about two rival chess clubs forced to share one room for a whole summer.",
    "Describe a day in the life of a night-shift librarian in a library that never closes.",
]
CHAT_USER_1 = ("Using the notes above, write a short summary of the three most important decisions and explain "
               "what each of them means for the team over the next month.")
CHAT_USER_2 = "Thank you. Now list the open questions the team still has to answer, one line each."
CHAT_HISTORY_TOKENS = 1000  # system + first user message, as the model's chat template renders them
CHAT_SECOND_TOKENS = 16  # the second turn is there for its TTFT
HTTP_TIMEOUT = 600.0
BUSY = 20.0  # percent of the CPU in use by others above which the run is flagged as noisy


class BenchError(RuntimeError):
    """A contender failed or answered short: the benchmark stops."""


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Stream:
    """One streamed generation as the client saw it."""

    sent: float
    times: list[float] = field(default_factory=list)  # arrival of every piece with text
    parts: list[str] = field(default_factory=list)
    finish: str | None = None
    usage_tokens: int | None = None  # completion_tokens, when the server reports usage
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    counted_tokens: int | None = None  # in-process: counted by a logits processor

    @property
    def tokens(self) -> int:
        for n in (self.usage_tokens, self.counted_tokens):
            if n is not None:
                return n
        return len(self.times)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent

    @property
    def end(self) -> float:
        return self.times[-1]

    @property
    def decode_tps(self) -> float:
        """Tokens per second after the first token (prompt processing excluded)."""
        span = self.times[-1] - self.times[0]
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else float("nan")

    @property
    def aggregate_tps(self) -> float:
        return self.tokens / (self.end - self.sent)

    def check(self, who: str, want: int) -> Stream:
        if not self.times:
            raise BenchError(f"{who}: no token streamed (finish_reason {self.finish!r})")
        if self.tokens < want or self.finish != "length":
            raise BenchError(f"{who}: asked for {want} tokens with EOS ignored, got {self.tokens} "
                             f"({len(self.times)} streamed pieces, finish_reason {self.finish!r}, "
                             f"usage.completion_tokens {self.usage_tokens}); text: {self.text[-200:]!r}")
        return self


def stream_http(client: httpx.Client, url: str, body: dict[str, Any], who: str) -> Stream:
    """POSTs a streaming OpenAI-style request and reads its SSE: the same code for every HTTP contender."""
    s = Stream(sent=time.perf_counter())
    with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            r.read()
            raise BenchError(f"{who}: POST {url} answered HTTP {r.status_code}: {r.text[:500]}")
        for line in r.iter_lines():
            now = time.perf_counter()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise BenchError(f"{who}: error in the stream: {json.dumps(chunk['error'])[:500]}")
            for choice in chunk.get("choices") or []:
                piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if piece:
                    s.times.append(now)
                    s.parts.append(piece)
                if choice.get("finish_reason"):
                    s.finish = choice["finish_reason"]
            usage = chunk.get("usage")
            if usage:
                s.usage_tokens = int(usage.get("completion_tokens", 0))
                s.prompt_tokens = int(usage.get("prompt_tokens", 0))
                details = usage.get("prompt_tokens_details") or {}
                if "cached_tokens" in details:
                    s.cached_tokens = int(details["cached_tokens"])
            timings = chunk.get("timings")  # llama-server's own report
            if timings and s.cached_tokens is None and "cache_n" in timings:
                s.cached_tokens = int(timings["cache_n"])
    return s


@dataclass
class Group:
    """C clients released together."""

    streams: list[Stream]

    @property
    def aggregate_tps(self) -> float:
        start = min(s.sent for s in self.streams)
        end = max(s.end for s in self.streams)
        return sum(s.tokens for s in self.streams) / (end - start)

    @property
    def ttft_p50(self) -> float:
        return median([s.ttft for s in self.streams])


def concurrently(run: Callable[[int], Stream], clients: int) -> Group:
    """Runs `run(i)` for i < clients on threads released by one barrier; re-raises the first failure."""
    barrier = threading.Barrier(clients)
    results: list[Stream | None] = [None] * clients
    errors: list[BaseException] = []

    def client(i: int) -> None:
        barrier.wait()
        try:
            results[i] = run(i)
        except BaseException as exc:  # noqa: B036 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return Group([s for s in results if s is not None])


class Contender:
    """Something that generates: `single` for one stream; `batches` when it serves concurrent clients;
    `chat` when it takes part in the prompt cache measure."""

    name: str
    batches = False
    chat = False

    def single(self, prompt: str, tokens: int) -> Stream:
        raise NotImplementedError

    def chat_turn(self, messages: list[dict[str, str]], tokens: int) -> Stream:
        raise NotImplementedError

    def close(self) -> None:
        pass


class HttpContender(Contender):
    def __init__(self, name: str, base: str, model: str, extra: dict[str, Any], *, batches: bool, chat: bool,
                 usage: bool) -> None:
        self.name, self.base, self.model, self.extra = name, base, model, extra
        self.batches, self.chat, self.usage = batches, chat, usage
        self.client = httpx.Client(timeout=HTTP_TIMEOUT, limits=httpx.Limits(max_connections=32,
                                                                              max_keepalive_connections=32))

    def _body(self, tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": tokens, "temperature": 0, "stream": True,
                                **self.extra}
        if self.usage:
            body["stream_options"] = {"include_usage": True}
        return body

    def single(self, prompt: str, tokens: int) -> Stream:
        return stream_http(self.client, self.base + "/v1/completions", {**self._body(tokens), "prompt": prompt},
                           self.name).check(self.name, tokens)

    def chat_turn(self, messages: list[dict[str, str]], tokens: int) -> Stream:
        return stream_http(self.client, self.base + "/v1/chat/completions",
                           {**self._body(tokens), "messages": messages}, self.name).check(self.name, tokens)

    def close(self) -> None:
        self.client.close()


class InProcess(Contender):
    name = "in-process llama-cpp-python"

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.eos = llm.token_eos()

    def single(self, prompt: str, tokens: int) -> Stream:
        import llama_cpp
        import numpy as np

        count = 0

        def no_eos(_ids: Any, scores: Any) -> Any:  # EOS ignored, as logit_bias does it; counts sampled tokens
            nonlocal count
            count += 1
            scores[self.eos] = -np.inf
            return scores

        s = Stream(sent=time.perf_counter())
        for chunk in self.llm.create_completion(prompt, max_tokens=tokens, temperature=0, stream=True,
                                                logits_processor=llama_cpp.LogitsProcessorList([no_eos])):
            now = time.perf_counter()
            choice = chunk["choices"][0]
            if choice["text"]:
                s.times.append(now)
                s.parts.append(choice["text"])
            if choice.get("finish_reason"):
                s.finish = choice["finish_reason"]
        s.counted_tokens = count
        return s.check(self.name, tokens)


def lms(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LMS_HOME": str(home)}
    exe = Path(sys.executable).parent / "lms"
    result = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(f"lms {' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result


def wait_http(url: str, proc: subprocess.Popen[bytes] | None, who: str, log: Path | None, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise BenchError(f"{who} did not answer {url} within {timeout:.0f} s"
                     f"{f' (exited {proc.returncode})' if proc is not None and proc.poll() is not None else ''}"
                     f"\n{tail}")


def start_llama_cpp_server(model: Path, log: Path) -> tuple[subprocess.Popen[bytes], str] | None:
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError:
        return None
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1", "--port",
             str(port), "--n_ctx", str(N_CTX), "--n_threads", str(physical_cores()),
             "--n_threads_batch", str(os.cpu_count() or 1)], stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/v1/models", proc, "llama_cpp.server", log)
    return proc, base


def start_llama_server(binary: Path, model: Path, parallel: int, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
    flags = help_text.stdout + help_text.stderr
    port = free_port()
    cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", str(N_CTX),
           "-np", str(parallel), "-t", str(physical_cores()), "-tb", str(os.cpu_count() or 1)]
    for flag in ("--kv-unified", "--cont-batching"):  # on by default, or missing, in some versions
        if flag in flags:
            cmd.append(flag)
    if "--no-webui" in flags:
        cmd.append("--no-webui")
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    wait_http(base + "/health", proc, "llama-server", log)
    return proc, base


def llama_server_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("version"):
            return line.split(":", 1)[1].strip()
    return "unknown version"


_numbers = random.Random()


def fresh(prompt: str) -> str:
    """The prompt behind a random number, so that no contender finds it in a prompt cache: TTFT outside the chat
    measure is the prompt read in full (llama-server's RAM cache or in-process llama-cpp-python's last prompt
    would otherwise serve a repeated prompt, and lmsd's slots only when the slot still holds it)."""
    return f"{_numbers.randrange(100_000, 1_000_000)}. {prompt}"


def chat_history(llm: Any, nonce: str, target: int) -> list[dict[str, str]]:
    """A system message of project notes, starting with a line of its own (`nonce`), plus the first user
    message, together about `target` tokens once the chat template renders them."""
    rng = random.Random(0)
    teams = ["platform", "billing", "search", "mobile", "data", "support", "security", "design"]
    verbs = ["agreed to move", "decided to postpone", "asked to review", "proposed to split", "voted to keep",
             "wants to rewrite", "will measure", "plans to retire"]
    things = ["the nightly export job", "the login page", "the invoice generator", "the search index",
              "the release checklist", "the onboarding guide", "the metrics dashboard", "the backup policy",
              "the API rate limits", "the test environment"]
    whens = ["before the end of the quarter", "next Tuesday", "after the audit", "once the new hire starts",
             "during the freeze", "by the 14th", "when the vendor answers", "in the next sprint"]
    lines = [f"Conversation {nonce}. You are the assistant of a software team. These are the notes of its "
             "planning meetings:"]
    system = ""
    for i in range(1, 400):
        lines.append(f"{i}. The {rng.choice(teams)} team {rng.choice(verbs)} {rng.choice(things)} "
                     f"{rng.choice(whens)}, because {rng.choice(things)} depends on it.")
        system = "\n".join(lines)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": CHAT_USER_1}]
        if i % 5 == 0 and rendered_tokens(llm, messages) >= target:
            return messages
    return [{"role": "system", "content": system}, {"role": "user", "content": CHAT_USER_1}]


def rendered_tokens(llm: Any, messages: list[dict[str, str]]) -> int:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:  # no template in the file: a rough count of the text
        return len(llm.tokenize("\n".join(m["content"] for m in messages).encode(), add_bos=False))
    fmt = Jinja2ChatFormatter(template, eos_token="", bos_token="", add_generation_prompt=True)
    return len(llm.tokenize(fmt(messages=messages).prompt.encode(), add_bos=False, special=True))


@dataclass
class ChatResult:
    first: Stream
    second: Stream


def two_turns(c: Contender, llm: Any, tokens: int) -> ChatResult:
    messages = chat_history(llm, uuid.uuid4().hex[:12], CHAT_HISTORY_TOKENS)
    first = c.chat_turn(messages, tokens)
    messages = [*messages, {"role": "assistant", "content": first.text}, {"role": "user", "content": CHAT_USER_2}]
    second = c.chat_turn(messages, CHAT_SECOND_TOKENS)
    return ChatResult(first, second)


@dataclass
class Results:
    single: dict[str, list[Stream]] = field(default_factory=dict)
    groups: dict[tuple[str, int], list[Group]] = field(default_factory=dict)
    chats: dict[str, list[ChatResult]] = field(default_factory=dict)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per request (default 128)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported (default 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run: one round")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every measurement as it is taken")
    parser.add_argument("--concurrency", default="1,2,4,8", help="concurrent clients to measure (default 1,2,4,8)")
    parser.add_argument("--llama-server", type=Path, default=None, help="llama-server binary (default: the one "
                        "`make llama-server` builds, $LMS_DEV_CACHE/llama-server/<llama-cpp-python version>/)")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
    levels = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    if not levels or levels[0] < 1:
        parser.error("--concurrency takes positive numbers, e.g. 1,2,4,8")
    parallel = max(levels)
    binary = args.llama_server or default_llama_server()

    from lmscli.fetch import SOURCES
    from tests.conftest import test_cache

    model = SOURCES[MODEL_KEY].fetch(test_cache() / "models")
    home = Path(tempfile.mkdtemp(prefix="lms-bench-batching-", dir="/tmp"))
    (home / "models" / "bench").mkdir(parents=True)
    os.symlink(model, home / "models" / "bench" / model.name)
    procs: list[subprocess.Popen[bytes]] = []
    contenders: list[Contender] = []
    notes: list[str] = []
    results = Results()
    ok = False
    started = time.monotonic()
    busy_before = busy_cpu()
    if busy_before > BUSY:
        say(f"the machine is busy ({busy_before:.0f} % CPU in use before the benchmark started): llama.cpp's "
            "threads wait on each other, so every contender slows down, unevenly; numbers from this run are noisy")
    others = None
    try:
        import llama_cpp

        say(f"model {model}")
        port = free_port()
        lms(home, "daemon", "up")
        lms(home, "server", "start", "--port", str(port))
        loaded = lms(home, "load", MODEL_KEY, "--parallel", str(parallel), "--context-length", str(N_CTX), "--yes")
        identifier = loaded.stdout.strip().splitlines()[-1]
        say(loaded.stderr.strip().splitlines()[-1] if loaded.stderr.strip() else f"loaded as {identifier}")
        notes.append(f"lmsd: lms load --parallel {parallel} --context-length {N_CTX}")
        contenders.append(HttpContender("lmsd HTTP (SSE)", f"http://127.0.0.1:{port}", identifier,
                                        {"ignore_eos": True}, batches=True, chat=True, usage=True))

        llm = llama_cpp.Llama(str(model), n_ctx=N_CTX, n_threads=physical_cores(),
                              n_threads_batch=os.cpu_count() or 1, verbose=False)
        contenders.append(InProcess(llm))

        started_server = start_llama_cpp_server(model, home / "llama_cpp_server.log")
        if started_server is None:
            notes.append("llama_cpp.server: skipped (not installed; pip install 'llama-cpp-python[server]')")
        else:
            procs.append(started_server[0])
            contenders.append(HttpContender("llama_cpp.server (SSE)", started_server[1], "x",
                                            {"logit_bias": {str(llm.token_eos()): -1e9}},
                                            batches=False, chat=False, usage=False))

        if binary.is_file() and os.access(binary, os.X_OK):
            proc, base = start_llama_server(binary, model, parallel, home / "llama_server.log")
            procs.append(proc)
            notes.append(f"llama-server {llama_server_version(binary)}: {' '.join(proc.args[3:])}")
            contenders.append(HttpContender("llama-server (SSE)", base, "x", {"ignore_eos": True,
                                            "cache_prompt": True}, batches=True, chat=True, usage=True))
        else:
            notes.append(f"llama-server: SKIPPED, no binary at {binary}; build it with `make llama-server` "
                         "(once, 20-25 minutes on 2 cores)")
            say(notes[-1])

        # lmsd starts its spare worker 5 s after a load: let that settle before anything is measured.
        time.sleep(6)
        say("warm-up")
        for c in contenders:
            c.single(fresh(PROMPT), 16)
            if c.batches:
                concurrently(lambda i, c=c: c.single(fresh(CLIENT_PROMPTS[i % len(CLIENT_PROMPTS)]), 8), parallel)
            if c.chat:
                two_turns(c, llm, 8)

        watch = CpuWatch(home)
        for r in range(args.rounds):
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
            for c in order:
                s = c.single(fresh(PROMPT), args.tokens)
                results.single.setdefault(c.name, []).append(s)
                log(args, f"{c.name}: single stream TTFT {s.ttft * 1000:.1f} ms, decode {s.decode_tps:.1f} tok/s")
            for n in levels:
                if n == 1:
                    continue
                for c in order:
                    if c.batches:
                        group = concurrently(
                            lambda i, c=c: c.single(fresh(CLIENT_PROMPTS[i % len(CLIENT_PROMPTS)]), args.tokens), n)
                        results.groups.setdefault((c.name, n), []).append(group)
                        log(args, f"{c.name}: {n} clients {group.aggregate_tps:.1f} tok/s, "
                                  f"TTFT p50 {group.ttft_p50 * 1000:.0f} ms")
            for c in order:
                if c.chat:
                    chat = two_turns(c, llm, args.tokens)
                    results.chats.setdefault(c.name, []).append(chat)
                    log(args, f"{c.name}: chat TTFT 1st turn {chat.first.ttft * 1000:.0f} ms, 2nd turn "
                              f"{chat.second.ttft * 1000:.0f} ms ({chat.second.cached_tokens} cached)")
            say(f"round {r + 1}/{args.rounds} done ({time.monotonic() - started:.0f} s)")
        others = watch.others()
        ok = True
    except BenchError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
    finally:
        for c in contenders:
            c.close()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run([str(Path(sys.executable).parent / "lms"), "daemon", "down"],
                       env={**os.environ, "LMS_HOME": str(home)}, capture_output=True)
        if ok:
            shutil.rmtree(home, ignore_errors=True)
        else:
            print(f"(logs kept in {home})", file=sys.stderr)
    if not ok:
        sys.exit(1)
    noisy = busy_before > BUSY or (others is not None and others > BUSY)
    notes.append(f"CPU used by other processes: {busy_before:.0f} % just before the run, "
                 f"{'?' if others is None else f'{others:.0f}'} % during the measured rounds"
                 f"{'  <- the machine was busy: noisy numbers' if noisy else ''}")
    report(results, [c.name for c in contenders], levels, notes, args, time.monotonic() - started)


class CpuWatch:
    """The share of the machine's CPU that processes outside the benchmark used from here to `others()`:
    busy CPU time minus that of the benchmark's own processes (this one, its children, every process with
    this LMS_HOME: the daemon and its workers)."""

    def __init__(self, home: Path) -> None:
        self.home = str(home)
        self.wall = time.monotonic()
        self.busy = self._busy()
        self.ours = self._ours()

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))

    def _ours(self) -> dict[int, float]:
        import psutil

        me = psutil.Process()
        procs = {me.pid: me, **{c.pid: c for c in me.children(recursive=True)}}
        for p in psutil.process_iter():
            try:
                if p.pid not in procs and p.environ().get("LMS_HOME") == self.home:
                    procs[p.pid] = p
            except psutil.Error:
                pass
        times: dict[int, float] = {}
        for pid, p in procs.items():
            try:
                t = p.cpu_times()
                times[pid] = t.user + t.system + (t.children_user + t.children_system if pid == me.pid else 0.0)
            except psutil.Error:
                pass
        return times

    def others(self) -> float:
        wall = time.monotonic() - self.wall
        busy = self._busy() - self.busy
        ours = sum(t - self.ours.get(pid, 0.0) for pid, t in self._ours().items())
        return max(0.0, busy - ours) / (wall * (os.cpu_count() or 1)) * 100


def log(args: argparse.Namespace, text: str) -> None:
    if args.verbose:
        say(text)


def busy_cpu() -> float:
    """Percent of the machine's CPU in use over one second (by others: the benchmark runs nothing then)."""
    import psutil

    return float(psutil.cpu_percent(interval=1.0))


def default_llama_server() -> Path:
    cache = Path(os.environ.get("LMS_DEV_CACHE", Path.home() / ".cache" / "lms-dev"))
    version = "unknown"
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith("llama-cpp-python=="):
            version = line.split("==", 1)[1].strip()
    return cache / "llama-server" / version / "llama-server"


def say(text: str) -> None:
    print(f"[bench_batching] {text}", file=sys.stderr, flush=True)


def report(results: Results, names: list[str], levels: list[int], notes: list[str], args: argparse.Namespace,
           elapsed: float) -> None:
    single = {n: (median([s.ttft for s in ss]), median([s.decode_tps for s in ss]),
                  median([s.aggregate_tps for s in ss])) for n, ss in results.single.items()}
    groups = {k: (median([g.aggregate_tps for g in gs]), median([g.ttft_p50 for g in gs]))
              for k, gs in results.groups.items()}
    for n, (ttft, _, agg) in single.items():
        groups[(n, 1)] = (agg, ttft)

    print(f"\nSmolLM2-135M-Instruct Q4_1, {args.tokens} tokens, temperature 0, EOS ignored, median of {args.rounds} "
          f"interleaved round(s), {os.cpu_count()} CPUs, n_ctx {N_CTX}, {elapsed:.0f} s")
    for note in notes:
        print(f"  {note}")

    print(f"\n{'single stream':32} {'TTFT ms':>9} {'decode tok/s':>13}   "
          "(prompts never cached: TTFT reads them in full)")
    for n in names:
        ttft, tps, _ = single[n]
        print(f"{n:32} {ttft * 1000:9.1f} {tps:13.1f}")

    print(f"\n{'concurrent clients':32} " + " ".join(f"{f'{c} client' + ('s' if c > 1 else ''):>16}" for c in levels))
    print("aggregate tok/s (TTFT p50 ms)")
    for n in names:
        cells = []
        for c in levels:
            if (n, c) in groups:
                agg, ttft = groups[(n, c)]
                cells.append(f"{agg:7.1f} ({ttft * 1000:5.0f})")
            else:
                cells.append("-")
        print(f"{n:32} " + " ".join(f"{cell:>16}" for cell in cells))
    if any(c > 1 for c in levels):
        print("  (1 client is the single-stream run; '-': serves one request at a time, not measured)")

    if results.chats:
        print(f"\n{'prompt cache: 2-turn chat':32} {'1st TTFT ms':>12} {'prompt':>7} {'2nd TTFT ms':>12} "
              f"{'prompt':>7} {'cached':>7} {'2nd/1st':>8}")
        for n in names:
            if n not in results.chats:
                continue
            cs = results.chats[n]
            t1, t2 = median([x.first.ttft for x in cs]), median([x.second.ttft for x in cs])
            p1, p2 = cs[-1].first.prompt_tokens, cs[-1].second.prompt_tokens
            cached = cs[-1].second.cached_tokens
            print(f"{n:32} {t1 * 1000:12.1f} {fmt_int(p1):>7} {t2 * 1000:12.1f} {fmt_int(p2):>7} "
                  f"{fmt_int(cached):>7} {t2 / t1:7.2f}x")
        print("  (prompt and cached: tokens, as the server's usage reports them for the last round)")

    print("\nratios (tok/s: higher is better for lmsd; TTFT: lower is better)")
    lmsd, inproc, server = "lmsd HTTP (SSE)", "in-process llama-cpp-python", "llama-server (SSE)"

    def ratio(label: str, value: float) -> None:
        print(f"  {label:62} {value:6.2f}x")

    ratio("lmsd / in-process llama-cpp-python, single-stream decode tok/s", single[lmsd][1] / single[inproc][1])
    ratio("lmsd / in-process llama-cpp-python, single-stream TTFT", single[lmsd][0] / single[inproc][0])
    if server in single:
        ratio("lmsd / llama-server, single-stream decode tok/s", single[lmsd][1] / single[server][1])
        for c in levels:
            if c > 1 and (lmsd, c) in groups and (server, c) in groups:
                ratio(f"lmsd / llama-server, {c}-client aggregate tok/s", groups[(lmsd, c)][0] / groups[(server, c)][0])
    else:
        print("  lmsd / llama-server: not measured (llama-server skipped: `make llama-server` builds it)")
    for n in names:
        if n in results.chats:
            cs = results.chats[n]
            ratio(f"{n}: 2nd-turn TTFT / 1st-turn TTFT",
                  median([x.second.ttft for x in cs]) / median([x.first.ttft for x in cs]))


def fmt_int(n: int | None) -> str:
    return "?" if n is None else str(n)


if __name__ == "__main__":
    main()
