"""Fixtures of the kernel tests: run a test on each CPU attention path."""

from __future__ import annotations

import pytest

from tierd_kernels import _native, build


def require_fused() -> None:
    """Skip where no C++ compiler exists; where one does, the fused kernel must load (a
    broken build fails the test instead of passing on the torch path)."""
    if build.compiler() is None and build.find() is None:
        pytest.skip("no C++ compiler to build the fused CPU kernel")
    assert _native.available(), "the fused CPU attention kernel did not build or load"


@pytest.fixture(params=["torch", "cpp"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """TIERD_KERNELS set to each path in turn (read by attend_blocks on every call)."""
    if request.param == "cpp":
        require_fused()
    monkeypatch.setenv("TIERD_KERNELS", request.param)
    return request.param
