"""gRPC failures as tierd errors, and the retry loop for calls that are safe to repeat.

Primitives: `error_from_rpc(err) -> TierdError`, `field_from_metadata(md)`,
`backoff_delays(max_retries, ...) -> Iterator[float]`, `call_with_retries(fn, ...)`.

The daemon aborts with `status.STATUS_OF[type(err)]` and puts the offending field in
trailing metadata; `error_from_rpc` rebuilds the same class so callers catch
`tierd_client.InvalidArgument`, never `grpc.RpcError`. Retries act on the rebuilt
`Unavailable` only: every other code means repeating the call would fail the same way.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc

from . import errors
from .status import ERROR_OF, FIELD_METADATA_KEY

T = TypeVar("T")

BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 2.0


def field_from_metadata(metadata: Iterable[Any] | None) -> str | None:
    """The value of the `tierd-field` trailer, if the daemon sent one."""
    for item in metadata or ():
        # grpc hands out _Metadatum(key, value) namedtuples or plain pairs.
        key, value = item[0], item[1]
        if key == FIELD_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def error_from_rpc(err: grpc.RpcError) -> errors.TierdError:
    """The typed tierd error a failed call stands for; unknown codes give TierdError."""
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else None
    details_fn = getattr(err, "details", None)
    details = (details_fn() if callable(details_fn) else None) or ""
    trailers_fn = getattr(err, "trailing_metadata", None)
    field = field_from_metadata(trailers_fn() if callable(trailers_fn) else None)
    if field and details.startswith(f"{field}: "):
        # The daemon may send str(err), which already starts with the field.
        details = details[len(field) + 2 :]
    cls = ERROR_OF.get(code) if code is not None else None
    if cls is None:
        name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
        return errors.TierdError(f"{name}: {details or 'call failed'}", field=field)
    return cls(details or (code.name if code is not None else "call failed"), field=field)


def backoff_delays(
    max_retries: int,
    *,
    base: float = BACKOFF_BASE_S,
    cap: float = BACKOFF_CAP_S,
    rng: random.Random | None = None,
) -> Iterator[float]:
    """Sleeps before each retry: exponential from `base`, capped, with "equal jitter".

    Half of each step is fixed so the backoff still grows; the random half spreads out
    clients that all lost the daemon at the same moment.
    """
    rand = (rng or random).random
    for attempt in range(max_retries):
        step = min(cap, base * (2**attempt))
        yield step / 2 + rand() * step / 2


def call_with_retries(
    fn: Callable[[], T],
    *,
    max_retries: int,
    rng: random.Random | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`fn()`, repeated after Unavailable up to `max_retries` more times."""
    delays = backoff_delays(max_retries, rng=rng)
    while True:
        try:
            return fn()
        except errors.Unavailable:
            delay = next(delays, None)
            if delay is None:
                raise
            sleep(delay)
