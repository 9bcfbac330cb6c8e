"""Typed domain errors.

Engines and handlers raise these; one interceptor per server maps them to gRPC status codes
(see `grpc_code`), so no handler chooses a status by hand and a client's mistake never turns
into INTERNAL.
"""

from __future__ import annotations


class VlsplitError(Exception):
    """Base class. `grpc_code` names a `grpc.StatusCode` member (kept as text: no grpc import here)."""

    grpc_code = "INTERNAL"


class InvalidRequest(VlsplitError):
    """The request itself is malformed: empty question, bad sampling value, unknown option."""

    grpc_code = "INVALID_ARGUMENT"


class BadImage(InvalidRequest):
    """The bytes are not an image we can decode (empty, truncated, not an image, unsupported mode)."""


class TooLarge(InvalidRequest):
    """Something exceeds a configured limit; the message always names the limit."""


class NotFound(VlsplitError):
    """An id the server does not (or no longer) know, e.g. an image_id whose bytes expired."""

    grpc_code = "NOT_FOUND"


class Overloaded(VlsplitError):
    """A bounded queue is full, or a rate limit or quota is used up; the client may retry later
    (`retry_after_s`, when known, is sent as the trailing metadata `retry-after-ms`)."""

    grpc_code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unauthenticated(VlsplitError):
    """No credentials, or ones the server does not know."""

    grpc_code = "UNAUTHENTICATED"


class PermissionDenied(VlsplitError):
    """Known credentials without the scope the call needs."""

    grpc_code = "PERMISSION_DENIED"


class DeadlineExceeded(VlsplitError):
    grpc_code = "DEADLINE_EXCEEDED"


class ModelMismatch(VlsplitError):
    """A payload or request was made for another model (fingerprint differs)."""

    grpc_code = "FAILED_PRECONDITION"


class CorruptPayload(VlsplitError):
    """An embedding payload failed its checksum, version or shape checks."""

    grpc_code = "DATA_LOSS"


class CheckpointError(VlsplitError):
    """A checkpoint directory is missing files, has unexpected tensors or an unsupported family."""

    grpc_code = "FAILED_PRECONDITION"


class Unavailable(VlsplitError):
    """A dependency (encoder, decoder) cannot be reached, or this server is still loading."""

    grpc_code = "UNAVAILABLE"


class Upstream(VlsplitError):
    """A downstream service answered with an error; its status code is passed on to the client."""

    def __init__(self, grpc_code: str, message: str):
        super().__init__(message)
        self.grpc_code = grpc_code
