"""A refused request body leaves no trace of itself in the error: the decoder's exception (whose
``.object`` / ``.doc`` is the body, plaintext values included) is not kept as its context."""

from __future__ import annotations

import pytest

from keyrotor.api import bodies
from keyrotor.api.errors import ApiError

KEY = "sk-proj-" + "Hq7Zx2Vb" * 6


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and all(exc is not e for e in out):
        out.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return out


@pytest.mark.parametrize(
    "raw",
    [
        b'{"plaintext": "' + KEY.encode() + b'\xff"}',  # not UTF-8
        b'{"plaintext": "' + KEY.encode() + b'"',  # not JSON
    ],
)
def test_an_unreadable_body_is_not_kept_in_the_error(raw: bytes) -> None:
    with pytest.raises(ApiError) as info:
        bodies.parse_json(raw)
    assert [type(e) for e in _chain(info.value)] == [ApiError]
    assert KEY not in repr(info.value)


def test_a_field_that_is_not_unicode_is_not_kept_in_the_error() -> None:
    with pytest.raises(ApiError) as info:
        bodies.text({"plaintext": KEY + "\ud800"}, "plaintext")
    assert [type(e) for e in _chain(info.value)] == [ApiError]
