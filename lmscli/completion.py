"""Shell completion (bash, zsh, fish through Typer's own mechanism: `lms --install-completion`): model keys and
loaded identifiers come from the daemon. Completion runs on every Tab, so it never starts the daemon, waits at
most a moment for it, and completes nothing (silently) when it is down or slow."""

from __future__ import annotations

_TIMEOUT = 0.5  # seconds: a Tab that hangs is worse than one that offers nothing


def _client() -> object | None:
    from lmscli.client import DaemonClient

    client = DaemonClient()
    return client if client.healthy(timeout=_TIMEOUT) else None


def model_keys(incomplete: str) -> list[str]:
    """Downloaded models' keys (`lms load`)."""
    try:
        from lmsd.api.v1 import control_pb2 as pb

        client = _client()
        if client is None:
            return []
        models = client.stub.ListModels(pb.ListModelsRequest(), timeout=_TIMEOUT).models  # type: ignore[attr-defined]
        return [m.key for m in models if m.key.startswith(incomplete)]
    except Exception:  # noqa: BLE001 - completion must never print a traceback into the user's shell
        return []


def loaded_identifiers(incomplete: str) -> list[str]:
    """Loaded instances' identifiers (`lms unload`)."""
    try:
        from lmsd.api.v1 import control_pb2 as pb

        client = _client()
        if client is None:
            return []
        loaded = client.stub.ListLoaded(pb.ListLoadedRequest(), timeout=_TIMEOUT).instances  # type: ignore[attr-defined]
        return [i.identifier for i in loaded if i.identifier.startswith(incomplete)]
    except Exception:  # noqa: BLE001
        return []


def chat_models(incomplete: str) -> list[str]:
    """What `lms chat` takes: loaded identifiers first, then downloaded keys."""
    return list(dict.fromkeys([*loaded_identifiers(incomplete), *model_keys(incomplete)]))
