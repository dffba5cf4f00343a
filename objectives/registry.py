"""A named registry, the pattern behind `pipeline.layer_term` and `pipeline.replace_with`: one registration per
entry, next to its code, and a lookup whose error lists the valid names (DomainBed's algorithm list, timm's
`@register_model`)."""

from __future__ import annotations

from typing import Generic, TypeVar

from models.errors import unknown

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name, in registration order (the order `names` lists them in, and so config errors)."""

    def __init__(self, kind: str):
        self.kind = kind  # what an entry is, for error messages: "layer term"
        self._entries: dict[str, T] = {}

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
        if name not in self._entries:
            raise unknown(self.kind, name, self._entries)
        return self._entries[name]

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)
