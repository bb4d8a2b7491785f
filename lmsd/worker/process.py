"""The worker process: owns one llama_cpp.Llama and serves the daemon over its stdin/stdout.

Protocol: one JSON object per line. The daemon sends `{"op": ...}` commands; the worker answers with
`{"ev": ...}` events. stdout is kept for the protocol alone: fd 1 is pointed at stderr at start-up, so
anything llama.cpp or a library prints can never corrupt it.

  ready            {"ev":"ready","pid":N}                        llama_cpp imported, waiting for "load"
  load             {"op":"load","path","n_ctx","embedding"}  ->  progress* then loaded | load_error
  generate         {"op":"generate","id","kind":"chat"|"completion","params":{...}}
                                                             ->  token* then done | error
  embed            {"op":"embed","id","input":[str]}         ->  embeddings | error
  cancel           {"op":"cancel","id"}                          the generation stops before its next token
  shutdown         {"op":"shutdown"}                             exit at once; the OS takes the memory back

Requests go through one queue served by one engine thread, never by calling the model from the reader;
continuous batching (several sequences at once) replaces the engine, not the protocol. When stdin closes
(the daemon is gone) the worker exits.
"""

from __future__ import annotations

import codecs
import functools
import json
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable, Generator
from typing import Any


class Channel:
    """Writes protocol events to the daemon; safe from any thread."""

    def __init__(self, fd: int) -> None:
        self._out = os.fdopen(fd, "wb", buffering=0)
        self._lock = threading.Lock()  # guards _out: the engine thread and the load callback both write

    def send(self, **event: Any) -> None:
        data = (json.dumps(event, separators=(",", ":")) + "\n").encode()
        with self._lock:
            self._out.write(data)


class Engine:
    """Runs commands one at a time, in arrival order, on its own thread."""

    def __init__(self, chan: Channel) -> None:
        self.chan = chan
        self.commands: queue.Queue[dict[str, Any]] = queue.Queue()
        self.cancelled: set[str] = set()  # request ids; set.add/discard are atomic under the GIL
        self.llm: Any = None
        self.embedder: Any = None  # a second context in embedding mode, for LLMs asked for embeddings
        self.path = ""
        self.n_ctx = 0

    def run(self) -> None:
        while True:
            msg = self.commands.get()
            op = msg.get("op")
            try:
                if op == "load":
                    self.load(msg)
                elif op == "generate":
                    self.generate(msg)
                elif op == "embed":
                    self.embed(msg)
                else:
                    self.chan.send(ev="error", id=msg.get("id", ""), message=f"unknown op {op!r}")
            except Exception as exc:  # noqa: BLE001 - a bad request must never end the worker
                detail = f"{type(exc).__name__}: {exc}"
                if op == "load":
                    self.chan.send(ev="load_error", message=detail)
                    print(traceback.format_exc()[-_LOG_MAX:], file=sys.stderr)
                else:
                    code, message = _classify(exc)
                    self.chan.send(ev="error", id=msg.get("id", ""), code=code, message=message)
                    # A client's mistake is one short line (clients must not be able to fill the disk through
                    # workers.log, which rotates only when a worker starts); a fault of ours keeps its traceback.
                    short = code != "internal_error"
                    print(f"request {msg.get('id', '')}: {code}: {message[:300]}" if short
                          else traceback.format_exc()[-_LOG_MAX:], file=sys.stderr)
            finally:
                self.cancelled.discard(msg.get("id", ""))

    def load(self, msg: dict[str, Any]) -> None:
        import llama_cpp
        import llama_cpp.llama_cpp as lib

        chan = self.chan
        last = [0.0]

        def on_progress(fraction: float, _user: object) -> bool:
            if fraction - last[0] >= 0.02 or fraction >= 1.0:
                last[0] = fraction
                chan.send(ev="progress", fraction=round(float(fraction), 4))
            return True  # keep loading

        callback = lib.llama_progress_callback(on_progress)  # referenced until the load returns
        default_params = lib.llama_model_default_params

        def params_with_progress() -> Any:
            params = default_params()
            params.progress_callback = callback
            return params

        # Llama() takes no progress callback; it builds its model params from this function, so supply it
        # for the duration of the load only.
        lib.llama_model_default_params = params_with_progress
        try:
            started = time.perf_counter()
            self.path = msg["path"]
            # llama.cpp rounds the context up to a multiple of 256 while llama-cpp-python sizes its own buffers
            # by what it was asked: a prompt between the two overflowed them (a 500). Ask for what will be used.
            n_ctx = -(-int(msg.get("n_ctx") or 0) // _CTX_STEP) * _CTX_STEP
            # An embedding model embeds each input in one batch: a batch smaller than the context (512 by default)
            # would cut longer inputs short without a word.
            batch = n_ctx if msg.get("embedding") and n_ctx else 512  # 512: llama-cpp-python's default
            self.llm = llama_cpp.Llama(
                model_path=msg["path"],
                n_ctx=n_ctx,
                n_threads=_physical_cores(),
                n_threads_batch=os.cpu_count() or 1,
                embedding=bool(msg.get("embedding")),
                verbose=False,
                n_batch=batch,
                n_ubatch=batch,
            )
        finally:
            lib.llama_model_default_params = default_params
        self.n_ctx = self.llm.n_ctx()
        self.chan.send(
            ev="loaded",
            n_ctx=self.n_ctx,
            seconds=round(time.perf_counter() - started, 4),
        )

    def generate(self, msg: dict[str, Any]) -> None:
        rid = msg["id"]
        if self.llm is None:
            raise RuntimeError("no model loaded")
        params = self._llama_params(dict(msg.get("params") or {}))
        if rid in self.cancelled:  # the client left while this request waited in the queue
            self.chan.send(ev="done", id=rid, finish_reason="cancelled", prompt_tokens=0, completion_tokens=0,
                           time_to_first_token=0.0, generation_time=0.0)
            return
        counts = _TokenCounter(params.pop("_bias", {}), lambda: rid in self.cancelled, self.llm.detokenize)
        import llama_cpp

        # A pass-through logits processor sees every sampled token: exact usage for streams too.
        params["logits_processor"] = llama_cpp.LogitsProcessorList([counts])
        params["stopping_criteria"] = llama_cpp.StoppingCriteriaList([counts.stop])
        started = time.perf_counter()
        first_token_at: float | None = None
        finish_reason, stopped = "stop", False
        chunks = self._stream(msg.get("kind", "completion"), params)
        try:
            for text, reason in chunks:
                if rid in self.cancelled:
                    finish_reason = "cancelled"
                    break
                if text:
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    self.chan.send(ev="token", id=rid, text=text)
                if reason:
                    finish_reason = reason
        except _Stop as stop:  # raised by the stopping criterion, from inside llama-cpp-python's loop
            finish_reason, stopped = stop.finish_reason, True
            if stop.why:
                print(f"request {rid}: {stop.why}", file=sys.stderr)
        finally:
            chunks.close()  # stops llama.cpp before its next token when we broke out early
        ended = time.perf_counter()
        eos_counted = finish_reason == "stop" and not stopped and counts.sampled  # the end token is no output
        completion_tokens = max(0, counts.sampled - (1 if eos_counted else 0))
        self.chan.send(
            ev="done",
            id=rid,
            finish_reason=finish_reason,
            prompt_tokens=counts.prompt_tokens,
            completion_tokens=completion_tokens,
            time_to_first_token=round((first_token_at or ended) - started, 6),
            generation_time=round(ended - started, 6),
        )

    def _llama_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Translates the OpenAI-style extras llama-cpp-python does not take itself."""
        # Logit bias is applied by our own logits processor (_TokenCounter): llama-cpp-python drops every other
        # logits processor when it adds its own for `logit_bias`.
        bias = {int(k): float(v) for k, v in (params.pop("logit_bias", None) or {}).items()}
        if params.pop("ignore_eos", False):
            bias[int(self.llm.token_eos())] = -1e9
        params["_bias"] = bias
        fmt = params.pop("response_format", None)
        if fmt:
            schema = None
            if fmt.get("type") == "json_schema":
                schema = (fmt.get("json_schema") or {}).get("schema")
            elif fmt.get("type") == "json_object":
                schema = fmt.get("schema")
            if fmt.get("type") in ("json_schema", "json_object"):
                from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

                try:
                    grammar = (LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False) if schema
                               else LlamaGrammar.from_string(JSON_GBNF, verbose=False))
                except Exception as exc:  # noqa: BLE001 - llama-cpp raises AssertionError, KeyError ... for what it cannot compile
                    raise ValueError(f"the JSON schema cannot be turned into a grammar: {type(exc).__name__}: {exc}") \
                        from None
                self._check_grammar(grammar)
                params["grammar"] = grammar
        return params

    def _check_grammar(self, grammar: Any) -> None:
        """llama.cpp refuses some grammars (left recursion, what its parser rejects) by returning no sampler, and
        llama-cpp-python adds that NULL to its sampler chain unchecked: the worker died with SIGSEGV. Build the
        sampler once here, where a refusal can become a 400."""
        import llama_cpp

        text, root = grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        if len(text) > _GRAMMAR_MAX:
            raise ValueError(f"the JSON schema turns into a grammar of {len(text) // 1024} KB; at most "
                             f"{_GRAMMAR_MAX // 1024} KB is supported")
        sampler = llama_cpp.llama_sampler_init_grammar(self.llm._model.vocab, text, root)
        if not sampler:
            raise ValueError("llama.cpp cannot use the grammar this JSON schema turns into (a reference to itself "
                             "with nothing before it, or a construct it does not support)")
        llama_cpp.llama_sampler_free(sampler)

    def _stream(self, kind: str, params: dict[str, Any]) -> Generator[tuple[str, str | None], None, None]:
        if kind == "chat":
            # create_chat_completion takes no stopping criteria, but its chat handler calls our Llama's
            # create_completion with its own: add ours to them for this request.
            import llama_cpp

            ours = params.pop("stopping_criteria")
            llm = self.llm

            def create_completion(*args: Any, **kwargs: Any) -> Any:
                kwargs["stopping_criteria"] = llama_cpp.StoppingCriteriaList(
                    [*(kwargs.get("stopping_criteria") or []), *ours])
                return type(llm).create_completion(llm, *args, **kwargs)

            llm.create_completion = create_completion
            try:
                for chunk in llm.create_chat_completion(stream=True, **params):
                    choice = chunk["choices"][0]
                    yield choice.get("delta", {}).get("content") or "", choice.get("finish_reason")
            finally:
                del llm.create_completion
        else:
            for chunk in self.llm.create_completion(stream=True, **params):
                choice = chunk["choices"][0]
                yield choice.get("text") or "", choice.get("finish_reason")

    def embed(self, msg: dict[str, Any]) -> None:
        if self.llm is None:
            raise RuntimeError("no model loaded")
        model = self.llm
        if not msg.get("embedding_model"):
            # An LLM asked for embeddings (as Ollama and llama.cpp's server allow): a second context in
            # embedding mode with mean pooling. The weights are memory-mapped, so they are shared.
            if self.embedder is None:
                import llama_cpp

                self.embedder = llama_cpp.Llama(
                    model_path=self.path, n_ctx=self.n_ctx, n_threads=_physical_cores(), embedding=True,
                    pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN, verbose=False,
                    n_batch=self.n_ctx, n_ubatch=self.n_ctx,  # each input whole, never cut at 512 tokens
                )
            model = self.embedder
        inputs = msg["input"]
        for text in inputs:
            n = len(model.tokenize(text.encode("utf-8"), add_bos=True, special=True))
            if n > self.n_ctx:
                raise ContextExceeded(f"an input is {n} tokens long; the context length is {self.n_ctx} tokens")
        result = model.create_embedding(inputs)
        vectors = [d["embedding"] for d in result["data"]]
        self.chan.send(ev="embeddings", id=msg["id"], data=vectors,
                       prompt_tokens=result.get("usage", {}).get("prompt_tokens", 0))


class ContextExceeded(ValueError):
    pass


def _classify(exc: Exception) -> tuple[str, str]:
    """An error code the daemon maps to an HTTP status, and a message for the client."""
    import re

    text = str(exc)
    m = re.search(r"Requested tokens \((\d+)\) exceed context window of (\d+)", text)
    if m:
        return "context_length_exceeded", (
            f"the prompt is {m.group(1)} tokens long, more than the model's context length of {m.group(2)} "
            "tokens; shorten it or load the model with a larger --context-length")
    if isinstance(exc, ContextExceeded):
        return "context_length_exceeded", text
    if isinstance(exc, (ValueError, TypeError, KeyError)) or type(exc).__module__.startswith("jinja2"):
        # Bad values, or messages the model's chat template refuses (jinja2 raises from the template itself).
        return "invalid_request_error", f"{type(exc).__name__}: {text}"
    return "internal_error", f"{type(exc).__name__}: {text}"


_LOG_MAX = 8192  # characters of one traceback in workers.log
_CTX_STEP = 256  # llama.cpp's context granularity
_GRAMMAR_MAX = 1024 * 1024  # bytes of grammar text a JSON schema may turn into


class _Stop(Exception):
    """Ends a generation from inside llama-cpp-python's sampling loop."""

    def __init__(self, finish_reason: str, why: str = "") -> None:
        super().__init__(why or finish_reason)
        self.finish_reason = finish_reason
        self.why = why


class _TokenCounter:
    """Called for each token: counts (prompt length, tokens sampled) and applies the request's logit bias, as a
    logits processor (before sampling); ends the generation when it is cancelled or its text can no longer
    stream, as a stopping criterion (after sampling).

    The checks live in the stopping criterion (plain Python, where an exception reaches us; a logits processor
    runs inside a ctypes callback, which swallows it) because llama-cpp-python's streaming loop does not yield
    while it holds back text it cannot decode: once the model emits bytes that are not UTF-8, nothing more is
    streamed and every further token costs time proportional to the whole text (found by schemathesis: a
    cancelled request on a random model kept its worker at 100 % CPU for over 15 minutes). A cancel is seen at
    the next token, and text that has turned into invalid UTF-8 ends the generation there (finish_reason "stop",
    the reason in workers.log).
    """

    def __init__(self, bias: dict[int, float], cancelled: Callable[[], bool] = lambda: False,
                 detokenize: Callable[[list[int]], bytes] | None = None) -> None:
        self.prompt_tokens = 0
        self.sampled = 0
        self.bias = bias
        self.cancelled = cancelled
        self.detokenize = detokenize
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.decoded = -1  # how many of the ids the stopping criterion saw were decoded (-1: none seen yet)

    def stop(self, input_ids: Any, _scores: Any) -> bool:
        """The stopping criterion: raises _Stop, or returns False."""
        if self.cancelled():
            raise _Stop("cancelled")
        if self.decoded < 0:
            self.decoded = len(input_ids)  # the prompt (and whatever the model had evaluated before it)
        elif self.detokenize is not None:
            fresh = [int(t) for t in input_ids[self.decoded:]]
            self.decoded = len(input_ids)
            try:
                self.utf8.decode(self.detokenize(fresh) if fresh else b"")
            except UnicodeDecodeError:
                raise _Stop("stop", f"ended after {self.sampled} tokens: the model produced bytes that are not "
                                    "UTF-8, so no more text could be streamed") from None
        return False

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.sampled == 0:
            self.prompt_tokens = len(input_ids)
        self.sampled += 1
        for token, value in self.bias.items():
            if 0 <= token < len(scores):
                scores[token] += value
        return scores


@functools.cache
def _physical_cores() -> int:
    try:
        import psutil

        return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except Exception:  # noqa: BLE001
        return max(1, os.cpu_count() or 1)


def main() -> None:
    proto_fd = os.dup(1)
    os.dup2(2, 1)  # from now on, stray prints land in the worker log, never in the protocol
    sys.stdout = sys.stderr
    chan = Channel(proto_fd)
    import llama_cpp  # noqa: F401 - imported now so a spare worker is warm before it is needed

    _physical_cores()  # imports psutil now too, not during a load

    engine = Engine(chan)
    threading.Thread(target=engine.run, name="engine", daemon=True).start()
    chan.send(ev="ready", pid=os.getpid())
    for line in sys.stdin.buffer:
        try:
            msg = json.loads(line)
        except ValueError:
            chan.send(ev="error", id="", message="malformed command")
            continue
        op = msg.get("op")
        if op == "shutdown":
            break
        if op == "cancel":
            engine.cancelled.add(msg.get("id", ""))
        else:
            engine.commands.put(msg)
    # The daemon asked us to stop, or is gone (stdin closed): exit now, whatever the engine is doing.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
