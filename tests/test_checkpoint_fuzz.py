"""Corrupted checkpoints, byte by byte: each is refused with a CheckpointError, or loads unchanged.

Real checkpoints (written by ``checkpoint.save``) are truncated, bit-flipped and
overwritten. A change in a byte the zip format does not read (a timestamp, a
"version made by") may be harmless: then every array and every field must
equal the original's. Any other exception than CheckpointError is a bug: the
scripts would end with a traceback instead of one ``error:`` line.
"""

import io
import zipfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_checkpoint import assert_same_checkpoint, small_checkpoint

from jaxbirds import checkpoint
from jaxbirds.checkpoint import CheckpointError

#: Optimiser, with statistics, block widths: both optimisers with and without statistics, and two blocks.
KINDS = [("sgd", False, (8,)), ("sgd", True, (8,)), ("adam", False, (8,)), ("adam", True, (8,)), ("sgd", True, (8, 5))]
LOCAL_HEADER, CENTRAL_ENTRY, END_RECORD = b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``(checkpoint, its file's bytes)`` for each of :data:`KINDS`."""
    directory = tmp_path_factory.mktemp("originals")
    originals = [small_checkpoint(optimizer, stats, hidden) for optimizer, stats, hidden in KINDS]
    return [(c, checkpoint.save(directory / f"{i}.npz", c).read_bytes()) for i, c in enumerate(originals)]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("mutated") / "c.npz"


def refused_or_unchanged(scratch, content: bytes, original) -> str:
    """Load ``content``: "refused" (a CheckpointError) or "unchanged" (equal to ``original``); nothing else."""
    scratch.unlink(missing_ok=True)  # a new file: overwriting one in place can cost ms (ext4 flushes on truncation)
    scratch.write_bytes(content)
    try:
        back = checkpoint.load(scratch)
    except CheckpointError:
        return "refused"
    assert_same_checkpoint(back, original)
    return "unchanged"


def stored_data(content: bytes) -> list[range]:
    """Where each member's bytes lie in the file: what its CRC-32 covers. A member's local header is 30
    bytes, then its name and an extra field, whose lengths are at bytes 26 and 28 of the header."""
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        spans = []
        for info in archive.infolist():
            name_length = int.from_bytes(content[info.header_offset + 26 : info.header_offset + 28], "little")
            extra_length = int.from_bytes(content[info.header_offset + 28 : info.header_offset + 30], "little")
            start = info.header_offset + 30 + name_length + extra_length
            spans.append(range(start, start + info.compress_size))
    return spans


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_a_truncated_checkpoint_is_always_refused(saved, scratch, data):
    original, content = data.draw(st.sampled_from(saved))
    length = data.draw(st.integers(0, len(content) - 1))
    assert refused_or_unchanged(scratch, content[:length], original) == "refused"


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_a_flipped_bit_is_refused_or_harmless_and_always_refused_in_the_data(saved, scratch, data):
    original, content = data.draw(st.sampled_from(saved))
    position = data.draw(st.integers(0, len(content) - 1))
    mutated = bytearray(content)
    mutated[position] ^= 1 << data.draw(st.integers(0, 7))
    outcome = refused_or_unchanged(scratch, bytes(mutated), original)
    if any(position in span for span in stored_data(content)):
        assert outcome == "refused"
        with pytest.raises(CheckpointError, match="Bad CRC-32"):
            checkpoint.load(scratch)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_overwritten_bytes_are_refused_or_harmless(saved, scratch, data):
    original, content = data.draw(st.sampled_from(saved))
    start = data.draw(st.integers(0, len(content) - 1))
    junk = data.draw(st.binary(min_size=1, max_size=min(64, len(content) - start)))
    refused_or_unchanged(scratch, content[:start] + junk + content[start + len(junk) :], original)


def flip(content: bytes, signature: bytes, offset: int, mask: int) -> bytes:
    """``content`` with ``mask`` xor-ed into the byte ``offset`` bytes after the first ``signature``."""
    at = content.index(signature) + offset
    return content[:at] + bytes([content[at] ^ mask]) + content[at + 1 :]


@pytest.mark.parametrize(
    "signature, offset, mask",
    [
        pytest.param(CENTRAL_ENTRY, 10, 0x01, id="compression method 1: NotImplementedError"),
        pytest.param(CENTRAL_ENTRY, 8, 0x01, id="the encrypted flag: RuntimeError (a password is required)"),
        pytest.param(CENTRAL_ENTRY, 8, 0x40, id="the strong-encryption flag: NotImplementedError"),
        pytest.param(LOCAL_HEADER, 29, 0x80, id="a local extra field longer than the file: EOFError"),
        pytest.param(END_RECORD, 19, 0x80, id="a directory offset before the file's start: ValueError"),
    ],
)
def test_damage_that_zipfile_reports_with_other_exceptions_is_refused_too(saved, scratch, signature, offset, mask):
    """Single bit flips, found by flipping every bit of a checkpoint, that make zipfile raise something
    other than BadZipFile (named in the test's id): rare among random flips, so each is pinned here."""
    original, content = saved[3]
    assert refused_or_unchanged(scratch, flip(content, signature, offset, mask), original) == "refused"


@pytest.mark.slow
def test_every_truncation_and_every_flipped_byte(saved, scratch):
    """Exhaustive: the files cut at every length, and one bit flipped in every byte (the bit rotating)."""
    for original, content in saved:
        for length in range(len(content)):
            assert refused_or_unchanged(scratch, content[:length], original) == "refused", length
    original, content = saved[1]  # sgd with statistics: every kind of member, in 5 kB
    outcomes = {"refused": 0, "unchanged": 0}
    for position in range(len(content)):
        mutated = bytearray(content)
        mutated[position] ^= 1 << position % 8
        outcomes[refused_or_unchanged(scratch, bytes(mutated), original)] += 1
    assert outcomes["refused"] > outcomes["unchanged"] > 0, outcomes
