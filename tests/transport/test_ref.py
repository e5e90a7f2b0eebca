"""Tensor keys that arrive in messages (disagfusion.transport.ref.check_key)."""

from __future__ import annotations

import pytest

from disagfusion.protocol import MissingBlobError
from disagfusion.transport.ref import check_key


@pytest.mark.parametrize("key", ["0a1b.denoise.latents", "job-1.encode.prompt_embeds"])
def test_a_tensor_key_is_dot_separated_tokens(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize("key", ["", "../x", "a/b.c", "job..x", "df:*", "job.encode.*", "a\x00b", "a b", ".hidden"])
def test_a_key_that_could_name_anything_else_is_refused(key: str) -> None:
    with pytest.raises(MissingBlobError, match="malformed"):
        check_key(key)
