"""The worker process: owns one llama_cpp.Llama and serves the daemon over its stdin/stdout.

Protocol: one JSON object per line. The daemon sends `{"op": ...}` commands; the worker answers with
`{"ev": ...}` events. stdout is kept for the protocol alone: fd 1 is pointed at stderr at start-up, so
anything llama.cpp or a library prints can never corrupt it.

  ready            {"ev":"ready","pid":N}                        llama_cpp imported, waiting for "load"
  load             {"op":"load","path","n_ctx","embedding","parallel"}
                                                             ->  progress* then loaded {n_ctx, parallel} | load_error
  generate         {"op":"generate","id","kind":"chat"|"completion","params":{...}}
                                                             ->  token* then done {finish_reason, prompt_tokens,
                                                                 completion_tokens, prompt_cached_tokens, ...} | error
  embed            {"op":"embed","id","input":[str]}         ->  embeddings | error
  cancel           {"op":"cancel","id"}                          the generation stops before its next token
  shutdown         {"op":"shutdown"}                             exit at once; the OS takes the memory back

Commands are read by the main thread and run by the engine thread, never by the reader: the engine steps the
batched engine (lmsd/worker/batch.py: `parallel` generations decoded together) and takes new commands between
steps; the events one step produces go out in one write. Embeddings run on a thread of their own. When stdin
closes (the daemon is gone) the worker exits.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from lmsd.worker.batch import ContextExceeded


class Channel:
    """Writes protocol events to the daemon; safe from any thread."""

    def __init__(self, fd: int) -> None:
        self._out = os.fdopen(fd, "wb", buffering=0)
        self._lock = threading.Lock()  # guards _out: the engine thread and the load callback both write

    def send(self, **event: Any) -> None:
        self.send_many([event])

    def send_many(self, events: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events).encode()
        with self._lock:
            self._out.write(data)


class Engine:
    """Runs the model on its own thread: loads, then steps the batched engine while anything generates, taking new
    commands between steps. Embeddings run on a thread of their own, so they never stall the streams."""

    def __init__(self, chan: Channel) -> None:
        self.chan = chan
        self.commands: queue.Queue[dict[str, Any]] = queue.Queue()
        self.embeds: queue.Queue[dict[str, Any]] = queue.Queue()
        self.llm: Any = None
        self.batch: Any = None  # the BatchEngine, once an LLM is loaded
        self.embedder: Any = None  # a second context in embedding mode, for LLMs asked for embeddings
        self.path = ""
        self.n_ctx = 0
        self._events: list[dict[str, Any]] = []
        self._loaded = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except BaseException:  # noqa: BLE001 - without its engine the worker would hang every request: end it
            print(traceback.format_exc()[-_LOG_MAX:], file=sys.stderr)
            sys.stderr.flush()
            os._exit(70)

    def _run(self) -> None:
        while True:
            busy = self.batch is not None and self.batch.busy
            try:
                msg = self.commands.get(block=not busy)
            except queue.Empty:
                msg = None
            while msg is not None:
                self._command(msg)
                try:
                    msg = self.commands.get_nowait()
                except queue.Empty:
                    msg = None
            if self.batch is not None and self.batch.busy:
                try:
                    self.batch.step()
                except Exception:  # noqa: BLE001 - a fault of ours fails what runs now, never the worker
                    print(traceback.format_exc()[-_LOG_MAX:], file=sys.stderr)
                    self.batch.reset("internal error in the worker")
            self._flush()

    def _emit(self, event: dict[str, Any]) -> None:
        self._events.append(event)  # not a bound `append`: _flush swaps the list

    def _flush(self) -> None:
        """One write for everything a step produced: a token for each stream at once."""
        if self._events:
            events, self._events = self._events, []
            self.chan.send_many(events)

    def _command(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        try:
            if op == "load":
                self.load(msg)
            elif op == "generate":
                self.generate(msg)
            elif op == "cancel":
                if self.batch is not None:
                    self.batch.cancel(str(msg.get("id", "")))
            elif op == "embed":
                self.embeds.put(msg)
            else:
                self.chan.send(ev="error", id=msg.get("id", ""), message=f"unknown op {op!r}")
        except Exception as exc:  # noqa: BLE001 - a bad request must never end the worker
            if op == "load":
                self.chan.send(ev="load_error", message=f"{type(exc).__name__}: {exc}")
                print(traceback.format_exc()[-_LOG_MAX:], file=sys.stderr)
            else:
                self._failed(msg, exc)

    def _failed(self, msg: dict[str, Any], exc: Exception,
                send: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Reports a request that failed: with the events of this step, or at once (`send`, from another thread)."""
        code, message = _classify(exc)
        (send or self._emit)({"ev": "error", "id": msg.get("id", ""), "code": code, "message": message})
        # A client's mistake is one short line (clients must not be able to fill the disk through workers.log,
        # which rotates only when a worker starts); a fault of ours keeps its traceback.
        short = code != "internal_error"
        print(f"request {msg.get('id', '')}: {code}: {message[:300]}" if short
              else traceback.format_exc()[-_LOG_MAX:], file=sys.stderr)

    def load(self, msg: dict[str, Any]) -> None:
        import llama_cpp
        import llama_cpp.llama_cpp as lib

        from lmsd.worker.batch import BatchEngine  # imports llama_cpp

        chan = self.chan
        last = [0.0]

        def on_progress(fraction: float, _user: object) -> bool:
            if fraction - last[0] >= 0.02 or fraction >= 1.0:
                last[0] = fraction
                chan.send(ev="progress", fraction=round(float(fraction), 4))
            return True  # keep loading

        callback = lib.llama_progress_callback(on_progress)  # referenced until the load returns
        embedding = bool(msg.get("embedding"))
        parallel = max(1, min(int(msg.get("parallel") or 1), _PARALLEL_MAX))
        default_model_params = lib.llama_model_default_params
        default_context_params = lib.llama_context_default_params
        init_from_model = lib.llama_init_from_model

        def model_params() -> Any:
            params = default_model_params()
            params.progress_callback = callback
            return params

        def context_params() -> Any:
            params = default_context_params()
            if not embedding:
                # `parallel` sequences over one KV cache of the whole context, shared (llama-server --kv-unified)
                params.n_seq_max = parallel
                params.kv_unified = True
            return params

        def init_context(model: Any, params: Any) -> Any:
            # Flash attention as llama-server decides it (`-fa auto`: on where the backend supports it): on the CPU it
            # reads a long prompt about twice as fast and never materializes the attention scores. Llama() only
            # knows on or off, and sets it just before this call.
            params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_AUTO
            return init_from_model(model, params)

        # Llama() takes neither a progress callback, a sequence count nor "auto" flash attention; it builds its
        # parameters from these functions, so supply them for the duration of the load only.
        lib.llama_model_default_params = model_params
        lib.llama_context_default_params = context_params
        lib.llama_init_from_model = init_context
        try:
            started = time.perf_counter()
            self.path = msg["path"]
            # llama.cpp rounds the context up to a multiple of 256: ask for what will be used.
            n_ctx = -(-int(msg.get("n_ctx") or 0) // _CTX_STEP) * _CTX_STEP
            # An embedding model embeds each input in one batch: a batch smaller than the context (512 by default)
            # would cut longer inputs short without a word.
            batch = n_ctx if embedding and n_ctx else 512  # 512: llama-cpp-python's default
            self.llm = llama_cpp.Llama(
                model_path=msg["path"],
                n_ctx=n_ctx,
                n_threads=_physical_cores(),
                n_threads_batch=os.cpu_count() or 1,
                embedding=embedding,
                verbose=False,
                n_batch=batch,
                n_ubatch=batch,
            )
        finally:
            lib.llama_model_default_params = default_model_params
            lib.llama_context_default_params = default_context_params
            lib.llama_init_from_model = init_from_model
        self.n_ctx = self.llm.n_ctx()
        if not embedding:
            self.batch = BatchEngine(self.llm, self._emit)
        self._loaded.set()
        self.chan.send(
            ev="loaded",
            n_ctx=self.n_ctx,
            parallel=len(self.batch.slots) if self.batch is not None else 1,
            seconds=round(time.perf_counter() - started, 4),
        )

    def generate(self, msg: dict[str, Any]) -> None:
        if self.llm is None:
            raise RuntimeError("no model loaded")
        if self.batch is None:
            raise ValueError("this is an embedding model: it makes embeddings, not text")
        params = dict(msg.get("params") or {})
        grammar = self._grammar(params.pop("response_format", None))
        self.batch.submit(msg["id"], msg.get("kind", "completion"), params, grammar)

    def _grammar(self, fmt: dict[str, Any] | None) -> tuple[bytes, bytes] | None:
        """The grammar `response_format` asks for, as (GBNF text, root rule)."""
        if not fmt or fmt.get("type") not in ("json_schema", "json_object"):
            return None
        schema = (fmt.get("json_schema") or {}).get("schema") if fmt.get("type") == "json_schema" \
            else fmt.get("schema")
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

        try:
            grammar = (LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False) if schema
                       else LlamaGrammar.from_string(JSON_GBNF, verbose=False))
        except Exception as exc:  # noqa: BLE001 - llama-cpp raises AssertionError, KeyError ... for what it cannot compile
            raise ValueError(f"the JSON schema cannot be turned into a grammar: {type(exc).__name__}: {exc}") \
                from None
        text, root = grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        if len(text) > _GRAMMAR_MAX:
            raise ValueError(f"the JSON schema turns into a grammar of {len(text) // 1024} KB; at most "
                             f"{_GRAMMAR_MAX // 1024} KB is supported")
        return text, root

    def run_embeddings(self) -> None:
        """The embedding thread: one request at a time, beside the generations."""
        self._loaded.wait()
        while True:
            msg = self.embeds.get()
            try:
                self.embed(msg)
            except Exception as exc:  # noqa: BLE001
                self._failed(msg, exc, send=lambda event: self.chan.send_many([event]))

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


def _classify(exc: Exception) -> tuple[str, str]:
    """An error code the daemon maps to an HTTP status, and a message for the client."""
    text = str(exc)
    if isinstance(exc, ContextExceeded):
        return "context_length_exceeded", text
    if isinstance(exc, (ValueError, TypeError, KeyError)) or type(exc).__module__.startswith("jinja2"):
        # Bad values, or messages the model's chat template refuses (jinja2 raises from the template itself).
        return "invalid_request_error", f"{type(exc).__name__}: {text}"
    return "internal_error", f"{type(exc).__name__}: {text}"


_LOG_MAX = 8192  # characters of one traceback in workers.log
_CTX_STEP = 256  # llama.cpp's context granularity
_GRAMMAR_MAX = 1024 * 1024  # bytes of grammar text a JSON schema may turn into
_PARALLEL_MAX = 64  # sequences one context decodes at once


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
    threading.Thread(target=engine.run_embeddings, name="embeddings", daemon=True).start()
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
        # A cancel goes through the same queue, after the generate it cancels: the engine sees them in order and
        # forgets a cancel for a request already over.
        engine.commands.put(msg)
    # The daemon asked us to stop, or is gone (stdin closed): exit now, whatever the engine is doing.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
