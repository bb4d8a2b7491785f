"""Shell completion (bash, zsh, fish through Typer's own mechanism: `lms --install-completion`): model keys and
loaded identifiers come from the daemon. Completion runs on every Tab, so it never starts the daemon, waits at
most a moment for it, and completes nothing (silently) when it is down or slow."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_TIMEOUT = 0.5  # seconds: a Tab that hangs is worse than one that offers nothing


def _ask(names: Callable[[Any, Any], list[str]], incomplete: str) -> list[str]:
    """`names(stub, pb)` from a running daemon, those starting with `incomplete`; nothing on any trouble."""
    try:
        from lmscli.client import DaemonClient
        from lmsd.api.v1 import control_pb2 as pb

        client = DaemonClient()
        if not client.healthy(timeout=_TIMEOUT):
            return []
        return [n for n in names(client.stub, pb) if n.startswith(incomplete)]
    except Exception:  # noqa: BLE001 - completion must never print a traceback into the user's shell
        return []


def model_keys(incomplete: str) -> list[str]:
    """Downloaded models' keys (`lms load`)."""
    return _ask(lambda stub, pb: [m.key for m in stub.ListModels(pb.ListModelsRequest(), timeout=_TIMEOUT).models],
                incomplete)


def loaded_identifiers(incomplete: str) -> list[str]:
    """Loaded instances' identifiers (`lms unload`)."""
    return _ask(lambda stub, pb: [i.identifier for i in
                                  stub.ListLoaded(pb.ListLoadedRequest(), timeout=_TIMEOUT).instances], incomplete)


def chat_models(incomplete: str) -> list[str]:
    """What `lms chat` takes: loaded identifiers first, then downloaded keys."""
    return list(dict.fromkeys([*loaded_identifiers(incomplete), *model_keys(incomplete)]))
