"""Registries that map short names in recipes to classes or functions."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from embedtrain.errors import EmbedtrainError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → object table; registering a name twice is an error."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._items:
            raise EmbedtrainError(
                f"unknown {self.kind} '{name}'{did_you_mean(name, self._items)}; "
                f"choose one of: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
