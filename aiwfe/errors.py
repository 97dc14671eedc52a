"""The one table from domain exceptions to gRPC status codes, with google.rpc details.

Each exception class carries its code (grpc-interceptor style). The error-mapping
interceptor turns them into a status with `ErrorInfo` (a stable reason) and, where they
apply, `BadRequest` field violations or `RetryInfo`/`QuotaFailure` details.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "aiwfe.dev"
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


class AiwfeError(Exception):
    """Base of every error a caller may see; `code` decides the gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        self.error_metadata = dict(metadata or {})

    def details(self) -> list[Message]:
        """google.rpc detail messages attached to the status."""
        return [
            error_details_pb2.ErrorInfo(
                reason=self.reason, domain=ERROR_DOMAIN, metadata=self.error_metadata
            )
        ]

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """Extra plain-text trailers (e.g. retry-after) besides the status details."""
        return ()

    def to_status(self) -> grpc.Status:
        """The full gRPC status, details packed into `grpc-status-details-bin`."""
        packed = []
        for detail in self.details():
            any_msg = any_pb2.Any()
            any_msg.Pack(detail)
            packed.append(any_msg)
        status = rpc_status.to_status(
            status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)
        )
        if extra := self.trailing_metadata():
            return Status(status.code, status.details, tuple(status.trailing_metadata) + extra)
        return status


class Status(grpc.Status):
    """A plain grpc.Status value (the grpc package defines only the interface)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


class InvalidArgument(AiwfeError):
    """The caller's request is malformed; lists every offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[tuple[str, str]], message: str | None = None) -> None:
        self.violations = list(violations)
        summary = "; ".join(f"{f}: {d}" for f, d in self.violations)
        super().__init__(message or f"invalid request: {summary}")

    def details(self) -> list[Message]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                for f, d in self.violations
            ]
        )
        return [*super().details(), bad]


class Unauthenticated(AiwfeError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(AiwfeError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class NotFound(AiwfeError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class AlreadyExists(AiwfeError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class FailedPrecondition(AiwfeError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Aborted(AiwfeError):
    code = grpc.StatusCode.ABORTED
    reason = "ABORTED"


class Unavailable(AiwfeError):
    """A live server saying something it needs is down. Tells gRPC clients not to retry
    at once (`grpc-retry-pushback-ms: -1`): retrying would only multiply the load on a
    failing dependency or an open circuit."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((RETRY_PUSHBACK_KEY, "-1"),)


class DependencyUnavailable(Unavailable):
    """A live service whose own dependency is down (unreachable, or its breaker open): the
    ErrorInfo names the dependency, so callers and their breakers know who failed, and
    RetryInfo says when to try again."""

    reason = "DEPENDENCY_UNAVAILABLE"

    def __init__(
        self, dependency: str, message: str, *, circuit: str = "", retry_after: float = 1.0
    ) -> None:
        metadata = {"dependency": dependency}
        if circuit:
            metadata["circuit"] = circuit
        super().__init__(message, metadata=metadata)
        self.retry_after = retry_after

    def details(self) -> list[Message]:
        return [*super().details(), retry_info(self.retry_after)]


def retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    """google.rpc.RetryInfo asking the caller to wait `seconds` before retrying."""
    secs = max(0.0, seconds)
    return error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=int(secs), nanos=int((secs % 1) * 1e9))
    )


class DeadlineExceeded(AiwfeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class ResourceExhausted(AiwfeError):
    """A limit was hit; tells the caller when to retry and which quota it exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        quota_violations: Iterable[tuple[str, str]] = (),
        reason: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after
        self.quota_violations = list(quota_violations)
        self.headers = dict(headers or {})

    def details(self) -> list[Message]:
        out = super().details()
        if self.retry_after is not None:
            out.append(retry_info(self.retry_after))
        if self.quota_violations:
            out.append(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(subject=s, description=d)
                        for s, d in self.quota_violations
                    ]
                )
            )
        return out

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        extra = dict(self.headers)
        if self.retry_after is not None:
            extra.setdefault("retry-after", str(max(1, round(self.retry_after))))
        return tuple(extra.items())


_DEPENDENCY_ATTR = "_aiwfe_dependency"


def attribute(error: grpc.aio.AioRpcError, dependency: str) -> grpc.aio.AioRpcError:
    """Marks `error` as the failure of a call to `dependency` (a `Downstream` does this), so
    passing it on names who failed."""
    setattr(error, _DEPENDENCY_ATTR, dependency)
    return error


def status_from_rpc_error(error: grpc.aio.AioRpcError) -> grpc.Status:
    """Re-raisable status of a downstream failure, keeping its google.rpc details.

    A bare UNAVAILABLE or DEADLINE_EXCEEDED of a call to a named dependency (transport
    failure, the dependency's own refusal or our deadline for it) gets an ErrorInfo naming
    that dependency: this service is alive and answering, so our caller's breaker must not
    count it against us. The code stays what it was.
    """
    trailers = tuple(error.trailing_metadata() or ())
    dependency = getattr(error, _DEPENDENCY_ATTR, None)
    code = error.code()
    message = error.details() or ""
    if dependency and not any(k == rpc_status.GRPC_DETAILS_METADATA_KEY for k, _ in trailers):
        if code is grpc.StatusCode.UNAVAILABLE:
            return DependencyUnavailable(dependency, f"{dependency}: {message}").to_status()
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(
                f"{dependency}: {message}",
                reason="DEPENDENCY_DEADLINE_EXCEEDED",
                metadata={"dependency": dependency},
            ).to_status()
    keep = (rpc_status.GRPC_DETAILS_METADATA_KEY, RETRY_PUSHBACK_KEY)
    return Status(code, message, tuple((k, v) for k, v in trailers if k in keep))


def internal_status(reference: str) -> grpc.Status:
    """Generic status for an unexpected failure: never leaks the exception, only a reference."""
    return AiwfeError(f"internal error (reference {reference}); the failure is logged").to_status()
