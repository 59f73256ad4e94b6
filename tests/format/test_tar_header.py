"""tar_header (tarfile's header for a name, size and checksum rewritten) is byte for
byte what tarfile writes, and tarfile reads it back."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardstream.format.index import _ustar, member_name, tar_header

_NAME = st.one_of(st.builds(member_name, st.integers(0, 10**7), st.sampled_from(["", ".zst"])),
                  st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF,
                                        blacklist_characters="/"), min_size=1, max_size=40))
_SIZE = st.one_of(st.integers(0, 8 ** 11 - 1), st.sampled_from([0, 1, 511, 512, 8 ** 11 - 1]))


@given(name=_NAME, size=_SIZE)
def test_tar_header_is_tarfiles(name, size):
    assert tar_header(name, size) == _ustar(name, size)


def test_tar_header_reads_back_and_large_sizes_go_to_tarfile():
    for size in (0, 5, 512, 70_000):
        data = bytes(size)
        member = tar_header("000001.ssb", size) + data + bytes(-size % 512)
        with tarfile.open(fileobj=io.BytesIO(member + bytes(1024))) as tf:
            info = tf.next()
            assert (info.name, info.size, info.mode, info.mtime) == ("000001.ssb", size, 0o444, 0)
            assert tf.extractfile(info).read() == data
    with pytest.raises(ValueError):  # ustar cannot hold it: tarfile's own error
        tar_header("big", 8 ** 11)
