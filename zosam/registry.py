"""One small registry class, used once per concern (models, datasets, optimizers, pruners...)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a name to a factory. Unknown names raise ``ValueError`` listing the allowed ones.

    Args:
        kind: what the registry holds, used in error messages (e.g. ``"model"``).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._deprecated: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``obj`` under ``name`` (names are unique)."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def deprecate(self, old: str, new: str) -> None:
        """Keep accepting ``old`` as a spelling of the registered ``new``, with a warning.

        ``old`` is not listed by :meth:`names` (so error messages and help show ``new``).
        """
        if new not in self._items or old in self._items:
            raise KeyError(f"cannot alias {self.kind} {old!r} to {new!r}")
        self._deprecated[old] = new

    def canonical(self, name: str) -> str:
        """``name``, or the registered name a deprecated alias stands for (no warning)."""
        return self._deprecated.get(name, name) if isinstance(name, str) else name

    def resolve(self, name: str, field: str | None = None) -> str:
        """:meth:`canonical`, with a ``FutureWarning`` naming ``field`` (default: the
        registry's kind) when ``name`` is a deprecated alias."""
        new = self.canonical(name)
        if new == name:
            return name
        warnings.warn(f"{field or self.kind}={name!r} is deprecated; use {new!r} (the same {self.kind})",
                      FutureWarning, stacklevel=3)
        return new

    def get(self, name: str) -> T:
        name = self.resolve(name)
        if name not in self._items:
            raise ValueError(
                f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._deprecated

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
