"""Large read buffers (fedbus/allocator.py): huge-page mappings, kept warm for the next read
only once nothing references them, never handed out twice."""

from __future__ import annotations

import mmap

import torch

from fedbus import allocator


def _base(buf):
    return buf.obj if isinstance(buf, memoryview) else buf


def test_a_warm_buffer_is_reused_only_when_every_view_over_it_is_gone(monkeypatch):
    monkeypatch.setattr(allocator, "_warm", [])
    size = 8 * 1024 * 1024
    first = allocator.large_buffer(size)
    assert len(first) == size and not memoryview(first).readonly
    first[:4] = b"abcd"
    view = torch.frombuffer(first[1024:], dtype=torch.uint8)  # a decoded tensor over it
    second = allocator.large_buffer(size)
    assert _base(second) is not _base(first), "a buffer still referenced was handed out again"
    del first, second
    third = allocator.large_buffer(size)  # the kept one (the first) is still referenced by the tensor
    assert isinstance(_base(third), mmap.mmap) and bytes(third[:4]) != b"abcd"
    del third, view
    fourth = allocator.large_buffer(size - 4096)  # now it is free: handed out again
    assert len(fourth) == size - 4096 and isinstance(fourth, memoryview)
    assert len(allocator._warm) == 1


def test_a_poor_fit_or_a_model_above_the_warm_limit_gets_a_fresh_mapping(monkeypatch):
    monkeypatch.setattr(allocator, "_warm", [])
    small = allocator.large_buffer(8 * 1024 * 1024)
    del small
    bigger = allocator.large_buffer(16 * 1024 * 1024)  # the free 8 MiB one does not fit
    assert len(bigger) == 16 * 1024 * 1024
    assert all(len(b) != 8 * 1024 * 1024 for b in allocator._warm), "the poor fit was dropped"
    monkeypatch.setattr(allocator, "WARM_MAX_BYTES", 4 * 1024 * 1024)
    huge = allocator.large_buffer(5 * 1024 * 1024)
    assert isinstance(huge, mmap.mmap) and all(b is not huge for b in allocator._warm)
    assert isinstance(allocator.large_buffer(1024), bytearray)  # below the mmap threshold
