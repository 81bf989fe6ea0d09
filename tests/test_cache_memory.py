"""bench.cache_memory: the one rule for the bytes a cache holds."""

import torch

from bench.cache_memory import storage_bytes


class Holder:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_counts_each_storage_once_through_containers():
    a, b = torch.zeros(10), torch.zeros(3, dtype=torch.float64)
    view = a[2:5]  # shares a's storage
    assert storage_bytes([{"x": a, "y": [view, (b,)]}]) == 10 * 4 + 3 * 8


def test_depth_limit_and_objects_only_when_asked():
    a = torch.zeros(4)
    assert storage_bytes([[[a]]], max_depth=1) == 0  # two lists down, one level allowed
    assert storage_bytes([Holder(t=a)]) == 0
    assert storage_bytes([Holder(t=a)], into=lambda obj: isinstance(obj, Holder)) == 16
