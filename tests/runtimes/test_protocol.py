"""Every runtime module satisfies ``runtimes.Runtime``, for encoders and decoders, with the protocol's signatures."""

from __future__ import annotations

import inspect

import pytest

from edgepipe.errors import MissingExtraError
from edgepipe.runtimes import RUNTIMES, Runtime, get_runtime

MEMBERS = ("precisions", "can_run_here", "same_machine", "lower_encoder", "lower_decoder", "load")


@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_runtime_module_satisfies_the_protocol(name):
    try:
        module = get_runtime(name)
    except MissingExtraError as exc:
        pytest.skip(f"runtime {name} is not installed here: {exc}")
    assert isinstance(module, Runtime)
    for member in MEMBERS:
        want = list(inspect.signature(getattr(Runtime, member)).parameters)[1:]  # less self
        got = list(inspect.signature(getattr(module, member)).parameters)
        assert got == want, f"{name}.{member}{got} differs from Runtime.{member}{want}"
