"""Typed errors rebuilt from gRPC status + trailing metadata; the retry loop."""

from __future__ import annotations

import random
from collections import namedtuple

import grpc
import pytest

from tierd_client import errors
from tierd_client.rpc import (
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    backoff_delays,
    call_with_retries,
    error_from_rpc,
    field_from_metadata,
)
from tierd_client.status import FIELD_METADATA_KEY, STATUS_OF, status_of

Metadatum = namedtuple("Metadatum", ["key", "value"])


class RpcErrorLike(grpc.RpcError):
    """Only what error_from_rpc reads from a failed call: code, details, trailers."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple = ()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailers


@pytest.mark.parametrize(("cls", "code"), list(STATUS_OF.items()))
def test_every_mapped_code_rebuilds_its_class(cls: type, code: grpc.StatusCode) -> None:
    err = error_from_rpc(
        RpcErrorLike(code, "bad thing", (Metadatum(FIELD_METADATA_KEY, "keys[3]"),))
    )
    assert type(err) is cls
    assert err.message == "bad thing"
    assert err.field == "keys[3]"
    assert str(err) == "keys[3]: bad thing"


@pytest.mark.parametrize("cls", list(STATUS_OF))
def test_round_trip_through_status_table(cls: type[errors.TierdError]) -> None:
    original = cls("oops", field="shape.dims")
    rebuilt = error_from_rpc(
        RpcErrorLike(status_of(original), original.message, ((FIELD_METADATA_KEY, "shape.dims"),))
    )
    assert type(rebuilt) is cls and rebuilt.field == original.field


def test_metadata_forms() -> None:
    assert field_from_metadata(None) is None
    assert field_from_metadata(()) is None
    assert field_from_metadata((("other", "x"),)) is None
    assert field_from_metadata((("other", "x"), (FIELD_METADATA_KEY, b"tokens"))) == "tokens"
    assert field_from_metadata([Metadatum(FIELD_METADATA_KEY, "layout")]) == "layout"


def test_no_field_and_empty_details() -> None:
    err = error_from_rpc(RpcErrorLike(grpc.StatusCode.NOT_FOUND, ""))
    assert isinstance(err, errors.NotFound)
    assert err.field is None and err.message


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED],
)
def test_unknown_codes_give_base_error(code: grpc.StatusCode) -> None:
    err = error_from_rpc(RpcErrorLike(code, "took too long", ((FIELD_METADATA_KEY, "x"),)))
    assert type(err) is errors.TierdError
    assert code.name in err.message and "took too long" in err.message
    assert err.field == "x"


def test_backoff_delays() -> None:
    delays = list(backoff_delays(10, rng=random.Random(7)))
    assert len(delays) == 10
    for attempt, d in enumerate(delays):
        step = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)
        assert step / 2 <= d <= step
    assert BACKOFF_BASE_S / 2 <= delays[0] <= BACKOFF_BASE_S
    assert max(delays) <= BACKOFF_CAP_S
    assert list(backoff_delays(0)) == []


def test_backoff_is_jittered() -> None:
    a = list(backoff_delays(5, rng=random.Random(1)))
    b = list(backoff_delays(5, rng=random.Random(2)))
    assert a != b


def test_retries_unavailable_then_succeeds() -> None:
    calls, sleeps = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise errors.Unavailable("draining")
        return "ok"

    assert call_with_retries(flaky, max_retries=5, sleep=sleeps.append) == "ok"
    assert len(calls) == 3 and len(sleeps) == 2


def test_retries_give_up_after_max() -> None:
    calls, sleeps = [], []

    def down() -> None:
        calls.append(1)
        raise errors.Unavailable("down")

    with pytest.raises(errors.Unavailable):
        call_with_retries(down, max_retries=4, sleep=sleeps.append)
    assert len(calls) == 5 and len(sleeps) == 4


@pytest.mark.parametrize("exc", [errors.InvalidArgument("x"), errors.TierdError("x")])
def test_other_errors_are_not_retried(exc: Exception) -> None:
    calls = []

    def bad() -> None:
        calls.append(1)
        raise exc

    with pytest.raises(type(exc)):
        call_with_retries(bad, max_retries=5, sleep=lambda _: None)
    assert len(calls) == 1


def test_field_prefix_in_details_is_not_repeated() -> None:
    trailers = ((FIELD_METADATA_KEY, "shape.dims"),)
    err = error_from_rpc(
        RpcErrorLike(grpc.StatusCode.INVALID_ARGUMENT, "shape.dims: wrong shape", trailers)
    )
    assert err.message == "wrong shape" and str(err) == "shape.dims: wrong shape"
