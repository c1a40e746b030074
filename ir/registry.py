"""One way to register anything: ops, passes, backends, savers, lowerings, kernels, costs and
frontend handlers are each a ``Registry``.

    BACKENDS = Registry("backend", group="graphopt.backends", error=ValueError)
    BACKENDS.register("mine", fn)            # a second "mine" fails, naming the first one's module
    BACKENDS.register("mine", fn2, replace=True)   # ... unless replaced on purpose
    BACKENDS.get("mien")                     # unknown backend 'mien' (did you mean 'mine'?); known: ...

Plugins register from their own packages: every installed distribution that declares an entry point
in the registry's ``group`` is imported, after the built-ins (``builtins``), the first time a
listing is asked for or a name is not found (so built-in lookups during import never load plugins).
"""
from __future__ import annotations

import difflib
import importlib.metadata
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class RegistryError(LookupError):
    """An unknown name, or a name registered twice without ``replace=True``."""


def did_you_mean(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3, cutoff=0.5)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


class Registry(Generic[T]):
    """Names -> entries of one kind; duplicates refused, did-you-mean on a miss, entry-point plugins."""

    def __init__(self, kind: str, *, group: str | None = None, error: type[Exception] = RegistryError,
                 builtins: Callable[[], None] | None = None, hint: str = ""):
        self.kind, self.group, self.error, self.hint = kind, group, error, hint
        self._builtins = builtins
        self._entries: dict[str, T] = {}
        self._owners: dict[str, str] = {}
        self._loaded = False

    def register(self, name: str, entry: T, *, replace: bool = False, owner: str | None = None) -> T:
        if name in self._entries and not replace:
            raise self.error(f"{self.kind} {name!r} is already registered (by {self._owners[name]}); "
                             "choose another name, or pass replace=True to replace it on purpose")
        self._entries[name] = entry
        self._owners[name] = owner or getattr(entry, "__module__", None) or "?"
        return entry

    def decorator(self, *names: str, replace: bool = False) -> Callable[[T], T]:
        """``@REG.decorator("a", "b")`` registers the decorated object under each name."""
        def wrap(entry: T) -> T:
            for name in names:
                self.register(name, entry, replace=replace)
            return entry
        return wrap

    def load(self) -> None:
        """The built-ins, then every installed plugin of the entry-point group (once)."""
        if self._loaded:
            return
        self._loaded = True
        if self._builtins is not None:
            self._builtins()
        if self.group:
            for entry in importlib.metadata.entry_points(group=self.group):
                try:
                    entry.load()
                except Exception as e:
                    raise self.error(f"the {self.kind} plugin {entry.name!r} ({entry.value}, entry point group "
                                     f"{self.group}) failed to load: {type(e).__name__}: {e}") from e

    def get(self, name: str) -> T:
        entry = self.find(name)
        if entry is None:
            known = ", ".join(sorted(self._entries)) if len(self._entries) <= 40 else f"{len(self._entries)} names"
            raise self.error(f"unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}; "
                             f"known: {known}{self.hint}")
        return entry

    def find(self, name: str) -> T | None:
        """The entry, or None (no error): for callers that have a fallback."""
        if name not in self._entries:
            self.load()
        return self._entries.get(name)

    def owner(self, name: str) -> str:
        return self._owners[name]

    def names(self) -> list[str]:
        self.load()
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        self.load()
        return sorted(self._entries.items())

    def values(self) -> list[T]:
        """The entries in registration order (an order that can mean priority, as for kernels)."""
        self.load()
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        self.load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self.load()
        return len(self._entries)
