"""A named registry, the pattern behind every name a config can give: architectures (`model.arch`), tasks
(`task.name`), layer terms (`pipeline.layer_term`) and replacement strategies (`pipeline.replace_with`). One
registration per entry, next to its code, and a lookup whose error lists the valid names (DomainBed's algorithm
list, timm's `@register_model`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from .errors import unknown

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name, in registration order. `loaders` import the modules that register built-in entries, in
    order from cheap to expensive: a lookup runs them only until the name turns up (importing torchvision costs
    seconds per process, so its architectures and tasks load only when asked for)."""

    def __init__(self, kind: str, loaders: Sequence[Callable[[], None]] = ()):
        self.kind = kind  # what an entry is, for error messages: "layer term"
        self._entries: dict[str, T] = {}
        self._loaders = list(loaders)

    def add(self, name: str, entry: T) -> T:
        """Register `entry` as `name`; a name registered twice is a bug (one entry would silently shadow the
        other), so it raises ValueError. Returns `entry`, so decorators can return it unchanged."""
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Unregister `name` (tests that register their own entry clean up with this)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry registered as `name`, or a UserError naming the valid ones (with a did-you-mean)."""
        for load in self._loaders:
            if name in self._entries:
                break
            load()
        if name not in self._entries:
            raise unknown(self.kind, name, self._entries)
        return self._entries[name]

    def names(self) -> list[str]:
        """Every registered name (built-ins loaded), in registration order."""
        for load in self._loaders:
            load()
        return list(self._entries)
