"""One generic registry per family: ``register(name, paper=URL, status=...)``, ``get`` with "did you mean"."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import SubspacesError, did_you_mean

STATUSES = ("complete", "partial", "experimental")


@dataclass(frozen=True)
class Entry:
    family: str
    name: str
    obj: Any
    paper: str
    status: str
    note: str = ""
    #: Per recipe (``"pretrain"``, ...), the hyperparameters and learning rate the method runs with there.
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


class Registry:
    def __init__(self, family: str) -> None:
        self.family = family
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, paper: str, status: str = "complete", note: str = "",
                 defaults: Mapping[str, Mapping[str, Any]] | None = None) -> Callable:
        if status not in STATUSES:
            raise ValueError(f"status={status!r}; allowed: {STATUSES}")

        def deco(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.family} method {name!r} is registered twice")
            self._entries[name] = Entry(self.family, name, obj, paper, status, note, dict(defaults or {}))
            obj.registry_name = name
            return obj

        return deco

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise SubspacesError(
                f"unknown {self.family} method {name!r}." + did_you_mean(name, self._entries)
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries())

    def entries(self) -> list[Entry]:
        return [self._entries[k] for k in sorted(self._entries)]


ADAPTERS = Registry("adapt")
TRAIN = Registry("train")
COMPRESS = Registry("compress")
MERGE = Registry("merge")
REGISTRIES = (ADAPTERS, TRAIN, COMPRESS, MERGE)


def list_methods() -> list[dict[str, str]]:
    """Every registered method as rows ``{family, name, paper, status, note}`` (the note says what a partial
    method leaves out)."""
    from . import adapters, compress, merge, optim  # noqa: F401  (importing registers the methods)

    return [
        {"family": e.family, "name": e.name, "paper": e.paper, "status": e.status, "note": e.note or ""}
        for reg in REGISTRIES
        for e in reg.entries()
    ]
