"""A small thread-safe LRU for the service's caches (rendered tables, planned requests).
Written here rather than taken from ``functools.lru_cache`` or cachetools: it must bound both
the number of entries and the sum of their weights (bytes), drop entries by a predicate (a
job's plan when the job ends), and be safe from the event loop and the worker thread at once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any


class LRU:
    """A small thread-safe LRU (rendered table responses, planned profile requests), bounded in
    entries and, with ``weigh``, in the sum of its values' weights (bytes): one large value must
    not pin memory that sixty-four small ones would not."""

    def __init__(self, size: int = 64, *, capacity: int | None = None,
                 weigh: Callable[[Any], int] | None = None) -> None:
        self.size, self.capacity, self.weigh = size, capacity, weigh
        self._data: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.weight = 0

    def get(self, key: Hashable) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key][0]
            return None

    def put(self, key: Hashable, value: Any) -> Any:
        w = self.weigh(value) if self.weigh is not None else 0
        with self._lock:
            self._drop_locked(key)
            if self.capacity is None or w <= self.capacity:
                self._data[key] = (value, w)
                self.weight += w
            while len(self._data) > self.size or (self.capacity is not None and self.weight > self.capacity):
                self._drop_locked(next(iter(self._data)))
        return value

    def discard(self, predicate: Callable[[Hashable, Any], bool]) -> int:
        """Drop every entry for which ``predicate(key, value)`` holds; returns how many."""
        with self._lock:
            gone = [k for k, (v, _) in self._data.items() if predicate(k, v)]
            for k in gone:
                self._drop_locked(k)
        return len(gone)

    def _drop_locked(self, key: Hashable) -> None:
        if key in self._data:
            self.weight -= self._data.pop(key)[1]

    def __len__(self) -> int:
        return len(self._data)
