"""The eviction policy: given the instance table and a load waiting for its turn, which instances must make
room, whether the load may start now, or why it can never fit. Pure decisions; the scheduler carries them out.

Three limits, each optional, all applied together (docs/lifecycle.md has the table):
- auto-evict (JIT loads only): every other JIT instance goes, so at most one JIT model is loaded (LM Studio).
- max_loaded_models: at most N instances of any origin (Ollama's OLLAMA_MAX_LOADED_MODELS).
- the memory budget: the loaded instances' accounted memory plus the new one's estimate stays within it.

Room is made from JIT instances only, least recently used first: idle ones, then busy ones (which drain: their
requests finish first), then ones still loading (which finish their load and serve who waits on them first).
Manual instances are never evicted: when they alone leave no room, the load is refused with the numbers.
A load starts only once the instances on their way out are really gone (their processes reaped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lmsd.errors import InsufficientMemory, LmsError, ResourceExhausted
from lmsd.instance import Instance, Origin


@dataclass
class Decision:
    victims: list[Instance] = field(default_factory=list)  # to drain and unload now (reason "evict")
    start_now: bool = False  # the load may start at once
    refusal: LmsError | None = None  # it can never fit while the manual instances stay


def eviction_order(instances: Sequence[Instance]) -> list[Instance]:
    """JIT instances that may be evicted, in the order they are: idle LRU first, then busy LRU, then loading."""
    live = [i for i in instances if i.origin == "jit" and not i.draining]

    def rank(i: Instance) -> tuple[int, float]:
        if i.state == "loading":
            return (2, i.last_used)
        return (1 if i.busy else 0, i.last_used)

    return sorted(live, key=rank)


def decide(
    instances: Sequence[Instance],
    *,
    key: str,
    origin: Origin,
    estimate: int,
    auto_evict: bool,
    max_loaded: int,
    budget: int | None,
) -> Decision:
    """What it takes to load one more instance of `key` (accounted `estimate` bytes). `instances` is the whole
    table, those on their way out included (they still hold their memory)."""
    live = [i for i in instances if not i.draining]
    candidates = eviction_order(instances)
    victims = list(candidates) if origin == "jit" and auto_evict else []

    def over(kept: Sequence[Instance]) -> str:
        if max_loaded and len(kept) + 1 > max_loaded:
            return "count"
        if budget is not None and sum(i.estimate for i in kept) + estimate > budget:
            return "memory"
        return ""

    for candidate in candidates:
        if not over([i for i in live if i not in victims]):
            break
        if candidate not in victims:
            victims.append(candidate)
    kept = [i for i in live if i not in victims]
    why = over(kept)
    if why == "count":
        manual = sorted(i.identifier for i in kept if i.origin == "manual")
        return Decision(refusal=ResourceExhausted(
            f"cannot load '{key}': max_loaded_models is {max_loaded} and {len(manual)} manually loaded "
            f"instance(s) fill it ({', '.join(manual)}), which are never evicted. Unload one with `lms unload`, "
            f"or raise the limit with `lms server settings --max-loaded N`."))
    if why == "memory":
        assert budget is not None
        used = sum(i.estimate for i in kept)
        held = ", ".join(f"{i.identifier} {_gb(i.estimate)}" for i in kept) or "none"
        return Decision(refusal=InsufficientMemory(
            f"cannot load '{key}': it needs an estimated {_gb(estimate)}, and the memory budget is {_gb(budget)} "
            f"with {_gb(used)} held by models that cannot be evicted ({held}). Unload a model, load with a "
            f"smaller --context-length, or change the budget with `lms server settings --memory-limit`."))
    # Everything still in the table counts until it is gone: the memory of a draining model is not free yet.
    blocked = (
        (max_loaded and len(instances) + 1 > max_loaded)
        or (budget is not None and sum(i.estimate for i in instances) + estimate > budget)
        # auto-evict: the other JIT models must be gone first; and never two JIT instances of one model
        or (origin == "jit" and auto_evict and any(i.origin == "jit" for i in instances))
        or (origin == "jit" and any(i.origin == "jit" and i.key == key for i in instances))
    )
    return Decision(victims=victims, start_now=not blocked)


def _gb(n: int) -> str:
    from lmsd.memory import format_bytes

    return format_bytes(n)
