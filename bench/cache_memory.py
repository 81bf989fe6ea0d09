"""Bytes a cache holds: the distinct tensor storages reachable from some roots (one counting rule for
every method's cache memory in the benchmarks)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def storage_bytes(roots: Iterable, max_depth: int = 6, into: Callable[[object], bool] = lambda obj: False) -> int:
    """Bytes of the tensor storages reachable from `roots` through dicts, lists and tuples (and the
    attributes of objects `into` accepts), each storage counted once, `max_depth` levels down."""
    seen: set[int] = set()

    def size(obj, depth: int) -> int:
        if torch.is_tensor(obj):
            storage = obj.untyped_storage()
            if storage.data_ptr() in seen:
                return 0
            seen.add(storage.data_ptr())
            return storage.nbytes()
        if depth >= max_depth:
            return 0
        if isinstance(obj, dict):
            return sum(size(v, depth + 1) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(size(v, depth + 1) for v in obj)
        if into(obj):
            return sum(size(v, depth + 1) for v in vars(obj).values())
        return 0

    return sum(size(root, 0) for root in roots)
