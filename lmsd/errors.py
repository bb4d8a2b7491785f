"""Errors the daemon reports to clients. gRPC and HTTP each map `kind` to their own status codes."""

from __future__ import annotations

from typing import Literal

Kind = Literal["not_found", "invalid_argument", "failed_precondition", "resource_exhausted", "unavailable", "internal"]


class LmsError(Exception):
    """An error with a message a user can act on, printed as-is by the CLI."""

    kind: Kind = "internal"
    code: str = "internal_error"  # OpenAI-style error code for the HTTP endpoint
    http_status: int | None = None  # when HTTP's status differs from what `kind` maps to
    retry_after: int | None = None  # seconds; sent as Retry-After with 429 and 503

    def __init__(self, message: str, *, code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retry_after is not None:
            self.retry_after = retry_after


class ModelNotFound(LmsError):
    kind = "not_found"
    code = "model_not_found"


class InvalidArgument(LmsError):
    kind = "invalid_argument"
    code = "invalid_request_error"


class FailedPrecondition(LmsError):
    kind = "failed_precondition"
    code = "failed_precondition"


class QueueFull(LmsError):
    kind = "resource_exhausted"
    code = "queue_full"
    retry_after = 1


class ResourceExhausted(LmsError):
    """A load refused because a limit (max_loaded_models) is filled by instances that are never evicted."""

    kind = "resource_exhausted"
    code = "max_loaded_models"
    http_status = 503
    retry_after = 30


class InsufficientMemory(LmsError):
    """A load refused because it cannot fit the memory budget even after every eviction allowed."""

    kind = "resource_exhausted"
    code = "insufficient_memory"
    http_status = 503
    retry_after = 30


class WaitExceeded(LmsError):
    """A request waited longer than max_wait for its model (other models held the memory meanwhile)."""

    kind = "unavailable"
    code = "model_busy"
    retry_after = 5


class Unavailable(LmsError):
    kind = "unavailable"
    code = "unavailable"
    retry_after = 1


class ModelLoadFailed(LmsError):
    """The worker could not load the file (corrupt GGUF, unsupported architecture, out of memory)."""

    kind = "failed_precondition"
    code = "model_load_failed"


class LoadKilled(LmsError):
    """A load ended from outside the file's control: no progress for load_timeout, or its worker was killed (out of
    memory?) or died. Worth retrying, unlike a file llama.cpp refuses."""

    kind = "unavailable"
    code = "model_load_interrupted"
    retry_after = 30


class WorkerGone(LmsError):
    """The instance's worker crashed while a request was using it."""

    kind: Kind = "internal"
    code = "worker_gone"


class WorkerStopped(WorkerGone):
    """The instance's worker was ended on purpose (an unload or shutdown after its grace period) while a request
    was using it: not a fault, and worth retrying."""

    kind = "unavailable"
    code = "model_unloaded"
    http_status = 503
    retry_after = 1


class WorkerError(LmsError):
    """llama.cpp failed on a request for a reason that is not the client's."""

    kind = "internal"
    code = "internal_error"
