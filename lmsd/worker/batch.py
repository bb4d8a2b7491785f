"""Continuous batching: several generations on one llama.cpp context, one token each per step.

The context has `parallel` sequences (slots) over one unified KV cache of the loaded context length, as
llama-server's `--kv-unified` and LM Studio do: any sequence may use all of it, and the cells are shared.
Every step builds one `llama_batch`: first the next token of every sequence that is generating, then chunks
of the prompts still being read, up to `n_batch` tokens, so a long prompt never stalls the streams already
running. After the decode each sequence that has logits samples with its own llama.cpp sampler chain (bias,
penalties, grammar, top-k/p, min-p, temperature, seeded dist): no logits reach Python.

KV cells. A request is admitted to a slot when its cells fit: its prompt plus `max_tokens` (or, without
`max_tokens`, its prompt plus _GROWTH, beyond which it grows while there is room). Requests wait in arrival
order — the oldest first, none overtakes — and a request that could never fit (a prompt of the whole context)
is refused at once. When a sequence without `max_tokens` grows past what is free, idle slots' caches go first,
then the youngest running sequence is preempted: its cells are freed and it waits at the head of the queue,
keeping its sampler and its text, and later reads its prompt and what it generated again (vLLM's
recompute preemption). The oldest sequence can always go on, so the engine never deadlocks.

Prompt cache. A finished request's tokens stay in its slot's cells. A new request takes the free slot whose
cache shares the longest prefix with its prompt, removes only the cells after that prefix, and reads only the
rest (llama-server's `cache_prompt`); `prompt_cached_tokens` in its `done` event says how many it reused.
An idle slot's cache stays in the KV cache only while nothing runs: every decode attends over every cell up to
the highest one in use, so another conversation's idle cells would slow each token of the running ones (and
a long prompt's reading) for nothing. Once anything runs, idle caches move to RAM (llama_state_seq_get_data),
at most a context's worth of cells in all (the least recently used go first), and come back
(llama_state_seq_set_data) when a request continues that conversation — like llama-server's `--cache-ram`, but
per slot: each slot keeps one conversation, in the KV cache or in RAM.
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lmsd.worker.text import TextStream

_GROWTH = 256  # cells reserved past the prompt for a request without max_tokens
_PENALTY_LAST_N = 64  # tokens the repetition penalties look back on (llama-cpp-python's last_n_tokens_size)
_NEVER = -1e9  # a logit bias that rules a token out unless nothing else is allowed
_SIMILAR = 0.5  # a slot's cache is reused when it shares at least this part of the prompt (llama-server's 0.5)
_PIECE = 64  # bytes of the buffer a token's text is written to (grown when a token needs more)

Emit = Callable[[dict[str, Any]], None]


class ContextExceeded(ValueError):
    pass


@dataclass(eq=False)
class Slot:
    """One llama.cpp sequence id; `cached` mirrors the tokens its KV cells hold, by position."""

    seq_id: int
    cached: list[int] = field(default_factory=list)
    seq: Sequence | None = None
    last_used: float = 0.0
    parked: Any = None  # its cache's cells copied out to RAM (a ctypes array): then it has none in the KV cache


@dataclass(eq=False)
class Sequence:
    """One generation request."""

    rid: str
    order: int  # arrival order: the queue is served in it
    tokens: list[int]  # the prompt, then every token sampled
    n_prompt: int
    limit: int  # tokens it may generate: max_tokens, and what the context leaves
    bounded: bool  # the client set max_tokens
    sampler: Any  # its llama_sampler chain, freed when it ends
    text: TextStream
    received: float
    tool_format: str = ""  # a chat offering tools: how the model writes calls (lmsd/tools.py), for the done event
    reserve: int = 0  # KV cells it holds, set when admitted
    generated: int = 0
    reused: int = -1  # prompt tokens found in the slot's cache (-1: not admitted yet)
    first_at: float | None = None
    slot: Slot | None = None
    cancelled: bool = False
    said_queued: bool = False  # a "queued" event went out: a "running" one follows when it is admitted


class BatchEngine:
    """Owns the generation side of one loaded `llama_cpp.Llama`. Every method runs on the worker's engine thread."""

    def __init__(self, llm: Any, emit: Emit, *, clock: Callable[[], float] = time.perf_counter) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llm
        self.emit = emit
        self.clock = clock
        self.ctx = llm.ctx
        self.vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_batch = llama_cpp.llama_n_batch(self.ctx)
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.slots = [Slot(i) for i in range(llama_cpp.llama_n_seq_max(self.ctx))]
        self.waiting: list[Sequence] = []  # by arrival order
        self.live: dict[str, Sequence] = {}  # request id -> every request not yet over
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.eog = [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)]
        self._eog = set(self.eog)
        self._order = itertools.count()
        self._piece = ctypes.create_string_buffer(_PIECE)
        self._formatter: Any = None
        self._shows_tools: bool | None = None  # whether the chat template shows the tools it is given

    # ------------------------------------------------------------------ requests in

    def submit(self, rid: str, kind: str, params: dict[str, Any], grammar: tuple[bytes, bytes] | None = None) -> None:
        """Queues a request; raises ValueError (a 400 for the client) when it can never run."""
        received = self.clock()
        stops = list(params.get("stop") or [])
        tool_format = ""
        if kind == "chat":
            prompt, template_stops = self._chat_prompt(params)
            stops += template_stops
            if params.get("tools"):
                from lmsd.tools import family

                tool_format = family(self.llm.metadata.get("tokenizer.chat_template"))
            if params.get("forced_call"):  # its grammar ends it: a stop string inside its JSON must not cut it
                stops = []
        else:
            text = str(params.get("prompt") or "")
            prompt = self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        if not prompt:  # an empty prompt (or a chat template that renders nothing): the model starts from BOS
            bos = self.llm.token_bos()
            if bos < 0:
                raise ValueError("the prompt is empty and this model has no beginning-of-text token to start from")
            prompt = [bos]
        if len(prompt) >= self.n_ctx:
            raise ContextExceeded(f"the prompt is {len(prompt)} tokens long, more than the model's context length of "
                                  f"{self.n_ctx} tokens leaves room for; shorten it or load the model with a larger "
                                  "--context-length")
        max_tokens = params.get("max_tokens")
        if max_tokens is None and kind != "chat":
            max_tokens = 16  # OpenAI's default for /v1/completions
        room = self.n_ctx - len(prompt)
        limit = room if max_tokens is None else max(0, min(int(max_tokens), room))
        sampler = self._sampler(kind, params, grammar)
        self._queue(Sequence(rid=rid, order=next(self._order), tokens=list(prompt), n_prompt=len(prompt),
                             limit=limit, bounded=max_tokens is not None, sampler=sampler, text=TextStream(stops),
                             received=received, tool_format=tool_format))

    def _chat_prompt(self, params: dict[str, Any]) -> tuple[list[int], list[str]]:
        if self._formatter is None:
            self._formatter = _chat_formatter(self.llm)
        messages, tools = params.get("messages") or [], params.get("tools")
        if tools or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
            result = self._render_with_tools(messages, tools or [])
        else:
            result = self._formatter(messages=messages)
        tokens = self.llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)
        stops = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return tokens, [s for s in stops if s]

    def _render_with_tools(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> Any:
        """A chat with tools, or with calls in its history, as lmsd/tools.py prepares it for this template: shown
        by the template if it shows tools, else the generic preamble; if the template refuses that (no system role,
        turns that must alternate), once more with the preamble in the first user message."""
        from lmsd import tools as tool_calls

        template = self.llm.metadata.get("tokenizer.chat_template")
        if self._shows_tools is None:
            self._shows_tools = tool_calls.renders_tools(
                lambda m, t: self._formatter(messages=m, tools=t).prompt)
        prepared, shown = tool_calls.for_template(template, messages, tools, shows_tools=self._shows_tools)
        try:
            return self._formatter(messages=prepared, tools=shown)
        except Exception:  # noqa: BLE001 - jinja2's errors, and the template's own raise_exception
            if self._shows_tools:
                raise
        prepared, shown = tool_calls.for_template(template, messages, tools, shows_tools=False, system_role=False)
        return self._formatter(messages=prepared, tools=shown)

    def _sampler(self, kind: str, params: dict[str, Any], grammar: tuple[bytes, bytes] | None) -> Any:
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        try:
            bias = {int(k): float(v) for k, v in (params.get("logit_bias") or {}).items()}
            bias = {t: b for t, b in bias.items() if 0 <= t < self.n_vocab}
            if params.get("ignore_eos"):
                # Finite, not -inf: when a grammar allows nothing but the end, the end is still what is sampled
                # (with every candidate at -inf llama.cpp would pick a token the grammar refuses, and abort).
                bias.update({t: _NEVER for t in self.eog})
            if bias:
                items = (lib.llama_logit_bias * len(bias))(*(lib.llama_logit_bias(t, b) for t, b in bias.items()))
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_logit_bias(self.n_vocab, len(bias), items))
            repeat = float(params.get("repeat_penalty", 1.0))
            freq = float(params.get("frequency_penalty", 0.0))
            present = float(params.get("presence_penalty", 0.0))
            if (repeat, freq, present) != (1.0, 0.0, 0.0):
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_penalties(
                    self.n_vocab, _PENALTY_LAST_N, repeat, freq, present))
            if grammar is not None:
                g = lib.llama_sampler_init_grammar(self.vocab, grammar[0], grammar[1])
                if not g:
                    raise ValueError("llama.cpp cannot use the grammar this JSON schema turns into (a reference to "
                                     "itself with nothing before it, or a construct it does not support)")
                lib.llama_sampler_chain_add(chain, g)
            # llama-cpp-python's defaults, which this server has always had: chat is cooler than completion
            temp = float(params.get("temperature", 0.2 if kind == "chat" else 0.8))
            if temp <= 0:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            else:
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(int(params.get("top_k", 40))))
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(float(params.get("top_p", 0.95)), 1))
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(float(params.get("min_p", 0.05)), 1))
                if float(params.get("typical_p", 1.0)) < 1.0:
                    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_typical(float(params["typical_p"]), 1))
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(temp))
                seed = params.get("seed")
                lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(
                    lib.LLAMA_DEFAULT_SEED if seed is None else int(seed) & 0xFFFFFFFF))
        except BaseException:
            lib.llama_sampler_free(chain)
            raise
        return chain

    def _queue(self, seq: Sequence) -> None:
        self.live[seq.rid] = seq
        bisect.insort(self.waiting, seq, key=lambda s: s.order)

    # ------------------------------------------------------------------ state

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(s.seq is not None for s in self.slots)

    def running(self) -> list[Sequence]:
        return sorted((s.seq for s in self.slots if s.seq is not None), key=lambda q: q.order)

    def _committed(self) -> int:
        """Cells the running sequences hold: their reservation, or what they use (with the token this step decodes)
        once they have grown past it. Admission and the batch count alike, so nothing admitted is preempted at once."""
        return sum(_holds(s.seq) for s in self.slots if s.seq is not None)

    def _idle_cached(self) -> int:
        return sum(len(s.cached) for s in self._idle_in_kv())

    def _idle_in_kv(self) -> list[Slot]:
        return [s for s in self.slots if s.seq is None and s.cached and s.parked is None]

    def _in_kv(self) -> int:
        return sum(len(s.cached) for s in self.slots if s.parked is None)

    # ------------------------------------------------------------------ one step

    def cancel(self, rid: str) -> None:
        """Marks a request cancelled; it ends at the next step (a request already over is no longer known)."""
        seq = self.live.get(rid)
        if seq is not None:
            seq.cancelled = True

    def step(self) -> None:
        """Ends what was cancelled, admits what fits, decodes one batch and samples from it."""
        for seq in [*self.waiting, *self.running()]:
            if seq.cancelled:
                self._finish(seq, "cancelled")
        self._admit()
        if self.running():
            for idle in self._idle_in_kv():
                self._park(idle)
        for seq in self.waiting:  # the daemon counts these as queued, not running
            if not seq.said_queued:
                seq.said_queued = True
                self.emit({"ev": "queued", "id": seq.rid})
        entries = self._build()
        if not entries:
            return
        ret = self.lib.llama_decode(self.ctx, self.batch)
        if ret == 1 and self._make_room():
            return  # llama.cpp found no room for this batch: with cells freed, the next step builds it again
        if ret != 0:
            self._fail([seq for seq, _, _ in entries], f"llama_decode failed ({ret})")
            return
        now = self.clock()
        for seq, n, out in entries:
            slot = seq.slot
            assert slot is not None
            start = len(slot.cached)
            slot.cached.extend(seq.tokens[start:start + n])
            if out >= 0:
                self._sampled(seq, self.lib.llama_sampler_sample(seq.sampler, self.ctx, out), now)

    def _admit(self) -> None:
        while self.waiting:
            seq = self.waiting[0]
            free = [s for s in self.slots if s.seq is None]
            if not free:
                return
            reserve = seq.n_prompt + seq.limit if seq.bounded else \
                min(seq.n_prompt + seq.limit, len(seq.tokens) + _GROWTH)
            reserve = max(reserve, len(seq.tokens))
            committed = self._committed()
            if committed + reserve > self.n_ctx:
                return  # waits for running sequences to end; nobody overtakes it
            slot = _choose_slot(free, seq.tokens)
            for other in self._idle_in_kv():  # from now on something runs
                if other is not slot:
                    self._park(other, keep=slot)
            keep = max(0, min(_common_prefix(slot.cached, seq.tokens), len(seq.tokens) - 1))
            if slot.parked is not None:
                self._unpark(slot, keep)
            keep = self._trim(slot, keep)
            self.waiting.pop(0)
            seq.reserve = reserve
            if seq.reused < 0:
                seq.reused = min(keep, seq.n_prompt)
            seq.slot, slot.seq = slot, seq
            if seq.said_queued:
                seq.said_queued = False
                self.emit({"ev": "running", "id": seq.rid})

    def _trim(self, slot: Slot, keep: int) -> int:
        """Keeps the first `keep` cells of a slot's cache; returns how many it really kept."""
        keep = min(keep, len(slot.cached))
        if keep < len(slot.cached):
            ok = self.lib.llama_memory_seq_rm(self.mem, slot.seq_id, keep, -1)
            # A cache that cannot be cut there (recurrent state), or lacks the start of its prefix (a sliding window
            # dropped it): start over. llama-server makes the same checks.
            if not ok:
                keep = 0
        if keep and self.lib.llama_memory_seq_pos_min(self.mem, slot.seq_id) > 0:
            keep = 0
        if keep == 0:
            self.lib.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        del slot.cached[keep:]
        return keep

    def _drop(self, slot: Slot) -> None:
        if slot.parked is None:
            self.lib.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        slot.parked = None
        slot.cached.clear()

    def _park(self, slot: Slot, keep: Slot | None = None) -> None:
        """Moves an idle slot's cache out of the KV cache into RAM, at most n_ctx cells in RAM in all: the least
        recently used parked caches make room, never `keep` (the one a request is about to take back); when nothing
        else can go, or the copy fails (no memory), this slot's cache is dropped instead."""
        parked = sorted((s for s in self.slots if s.parked is not None and s is not keep), key=lambda s: s.last_used)
        held = sum(len(s.cached) for s in self.slots if s.parked is not None)
        while parked and held + len(slot.cached) > self.n_ctx:
            held -= len(parked[0].cached)
            self._drop(parked.pop(0))
        size = self.lib.llama_state_seq_get_size(self.ctx, slot.seq_id)
        try:
            data = (ctypes.c_uint8 * size)() if size > 0 and held + len(slot.cached) <= self.n_ctx else None
        except MemoryError:
            data = None
        if data is None or self.lib.llama_state_seq_get_data(self.ctx, data, size, slot.seq_id) != size:
            self._drop(slot)
            return
        self.lib.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        slot.parked = data

    def _unpark(self, slot: Slot, keep: int) -> None:
        """Brings a parked cache back into the KV cache when `keep` of its cells are worth having (and fit), else
        forgets it."""
        fits = len(slot.cached) <= self.n_ctx - self._in_kv()  # while parked, none of its cells are in the KV cache
        data, slot.parked = slot.parked, None
        if not keep or not fits or self.lib.llama_state_seq_set_data(self.ctx, data, len(data), slot.seq_id) == 0:
            self.lib.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)  # set_data may have failed half-way
            slot.cached.clear()

    def _build(self) -> list[tuple[Sequence, int, int]]:
        """Fills the batch: one token for each generating sequence, then prompt chunks. Returns (sequence, tokens
        added, batch index of its logits or -1)."""
        while self._committed() + self._idle_cached() > self.n_ctx and self._make_room():
            pass
        running = self.running()
        decoding = [q for q in running if len(q.tokens) - len(q.slot.cached) == 1]  # type: ignore[union-attr]
        b = self.batch
        n = 0
        entries: list[tuple[Sequence, int, int]] = []
        free = self.n_ctx - self._in_kv()
        prefilling = [q for q in running if q not in decoding]
        for q in [*decoding, *prefilling]:  # every generating sequence gets its token before any prompt is read
            slot = q.slot
            assert slot is not None
            pending = len(q.tokens) - len(slot.cached)
            take = min(pending, self.n_batch - n, free - n)
            if take <= 0:
                continue
            base = len(slot.cached)
            for i in range(take):
                b.token[n + i] = q.tokens[base + i]
                b.pos[n + i] = base + i
                b.n_seq_id[n + i] = 1
                b.seq_id[n + i][0] = slot.seq_id
                b.logits[n + i] = False
            n += take
            out = -1
            if base + take == len(q.tokens):
                out = n - 1
                b.logits[out] = True
            entries.append((q, take, out))
        b.n_tokens = n
        return entries

    def _make_room(self) -> bool:
        """Frees cells: the least recently used idle cache, else the youngest running sequence (preempted)."""
        idle = self._idle_in_kv()
        if idle:
            self._drop(min(idle, key=lambda s: s.last_used))
            return True
        running = self.running()
        if len(running) < 2:
            return False
        victim = running[-1]
        slot = victim.slot
        assert slot is not None
        self._drop(slot)
        slot.seq, victim.slot = None, None
        self._queue(victim)
        return True

    # ------------------------------------------------------------------ tokens out

    def _sampled(self, seq: Sequence, token: int, now: float) -> None:
        if token in self._eog:
            self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        seq.generated += 1
        # A chat offering tools gets control tokens as text: [TOOL_CALLS] and <|python_tag|> are how calls start.
        text = seq.text.feed(self._token_bytes(token, special=bool(seq.tool_format)))
        if text:
            if seq.first_at is None:
                seq.first_at = now
            self.emit({"ev": "token", "id": seq.rid, "text": text})
        if seq.text.stopped:
            self._finish(seq, "stop")
        elif seq.generated >= seq.limit:
            self._finish(seq, "length")

    def _token_bytes(self, token: int, special: bool = False) -> bytes:
        n = self.lib.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, special)
        if n < 0:
            self._piece = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, special)
        return self._piece.raw[:max(n, 0)]

    def _finish(self, seq: Sequence, reason: str) -> None:
        now = self.clock()
        if reason != "cancelled":
            tail = seq.text.finish()
            if tail:
                if seq.first_at is None:
                    seq.first_at = now
                self.emit({"ev": "token", "id": seq.rid, "text": tail})
        self._release(seq, now)
        self.emit({"ev": "done", "id": seq.rid, "finish_reason": reason, "prompt_tokens": seq.n_prompt,
                   "completion_tokens": seq.generated, "prompt_cached_tokens": max(seq.reused, 0),
                   "time_to_first_token": round((seq.first_at or now) - seq.received, 6),
                   "generation_time": round(now - seq.received, 6),
                   **({"tool_format": seq.tool_format} if seq.tool_format else {}),
                   **({"stop_sequence": seq.text.hit} if seq.text.hit else {})})

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        for seq in seqs:
            if seq.slot is not None:
                self._drop(seq.slot)
            self._release(seq, self.clock())
            self.emit({"ev": "error", "id": seq.rid, "code": "internal_error", "message": message})

    def _release(self, seq: Sequence, now: float) -> None:
        self.live.pop(seq.rid, None)
        if seq.slot is not None:
            seq.slot.seq = None
            seq.slot.last_used = now
            seq.slot = None
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.sampler is not None:
            self.lib.llama_sampler_free(seq.sampler)
            seq.sampler = None

    def reset(self, message: str) -> None:
        """After a fault of ours: fails every request and empties every slot (their caches may not match the KV)."""
        self._fail([*self.waiting, *self.running()], message)
        for slot in self.slots:
            self._drop(slot)
        self.lib.llama_memory_clear(self.mem, False)  # whatever the bookkeeping missed


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _choose_slot(free: list[Slot], tokens: list[int]) -> Slot:
    """Which free slot a request takes: the one whose cache shares the longest prefix with it, when that is at
    least half of its prompt (a chat resending its history); otherwise an empty slot, else the least recently used
    cache — a BOS or a short common system prompt is no reason to overwrite another conversation's cache."""
    # What a slot could give: its common prefix, short of the prompt's last token (always read for the logits)
    common, best = max(((min(_common_prefix(s.cached, tokens), len(tokens) - 1), s) for s in free), key=lambda c: c[0])
    if common > 0 and common >= _SIMILAR * len(tokens):
        return best
    empty = [s for s in free if not s.cached]
    return empty[0] if empty else min(free, key=lambda s: s.last_used)


def _holds(seq: Sequence) -> int:
    """KV cells a running sequence counts for: its reservation, or what it uses with this step's token once it has
    grown past it."""
    slot = seq.slot
    assert slot is not None
    return max(seq.reserve, len(slot.cached) + int(len(seq.tokens) - len(slot.cached) == 1))


def _chat_formatter(llm: Any) -> Any:
    """The model's own chat template (from the GGUF), rendered by llama-cpp-python's Jinja2 formatter; a model
    without one gets llama-cpp-python's fallback, the Llama 2 format."""
    from llama_cpp import llama_chat_format

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return llama_chat_format.format_llama2
    eos, bos = llm.token_eos(), llm.token_bos()
    return llama_chat_format.Jinja2ChatFormatter(
        template=template,
        eos_token=llm._model.token_get_text(eos) if eos != -1 else "",
        bos_token=llm._model.token_get_text(bos) if bos != -1 else "",
        stop_token_ids=[eos],
    )
