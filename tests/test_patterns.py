"""Key patterns (Redis globs): telstate's matcher against a real Redis's KEYS."""

from __future__ import annotations

import platform

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from telstate.utils import compile_pattern

# Few letters, so that patterns and keys meet often; the pattern's specials too.
_KEY_BYTES = st.sampled_from(b"ab*?[]^-\\\x00\x7f\x80\xff")
_PATTERN_PIECES = st.sampled_from(
    [b"a", b"b", b"*", b"**", b"?", b"[ab]", b"[^a]", b"[b-a]", b"\\*", b"\\", b"[", b"]", b"-"]
    + [b"\xff", b"\x80"]
    # Ranges of bytes above 0x7f: Redis on x86 compares them as signed
    # (as telstate does everywhere); where C's char is unsigned, it does not.
    + (
        [b"[a-\xff]", b"[\x80-b]", b"[^\x00-\x80]", b"[\xff-\x80]"]
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
        else []
    )
)


@settings(max_examples=300, deadline=None)
@given(
    pattern=st.lists(_PATTERN_PIECES, max_size=8).map(b"".join),
    keys=st.lists(st.lists(_KEY_BYTES, max_size=8).map(bytes), max_size=12, unique=True),
)
def test_patterns_match_what_redis_keys_matches(redis_server, pattern, keys):
    client = redis_server.client()
    try:
        client.flushdb()
        for key in keys:
            client.set(key, b"v")
        expected = sorted(client.keys(pattern))
    finally:
        client.close()
    regex = compile_pattern(pattern)
    assert sorted(key for key in keys if regex.fullmatch(key)) == expected


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "pattern, key, matches",
    [
        (b"*a" * 12 + b"b", b"a" * 60, False),
        (b"*a" * 12 + b"b", b"a" * 60 + b"b", True),
        (b"*" * 1000 + b"x", b"y" * 10_000, False),
        (b"*?" * 30 + b"z", b"q" * 5000, False),
        (b"*[ab]*[ab]*[ab]*[ab]*[ab]*[ab]*[ab]*[ab]*c", b"ab" * 3000, False),
    ],
)
def test_a_hostile_pattern_is_matched_without_backtracking(pattern, key, matches):
    """A pattern from a file (an export's selection) cannot hang a reader.

    Each of these, translated star by star into ``.*``, backtracks for longer
    than the test's timeout.
    """
    assert bool(compile_pattern(pattern).fullmatch(key)) is matches
