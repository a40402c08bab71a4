"""Components registered by name (torchtitan-style specs): pretraining stages, fine-tuning tasks. A config names
one; the trainer looks it up here and never compares strings."""

from __future__ import annotations

from typing import Generic, TypeVar

from core.config import ConfigError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """name -> component (each has a `name`); `setting` is the config key that names one, for the error line."""

    def __init__(self, what: str, setting: str):
        super().__init__()
        self.what, self.setting = what, setting

    def register(self, item: T) -> T:
        """Make `item` available under `item.name` (a later registration replaces one of the same name)."""
        name = getattr(item, "name", "")
        if not name:
            raise ValueError(f"{type(item).__name__}: a {self.what} needs a name")
        self[name] = item
        return item

    def lookup(self, name: str) -> T:
        if name not in self:
            raise ConfigError(f"{self.setting}: unknown {self.what} {name!r}; registered: {', '.join(sorted(self))}")
        return self[name]
