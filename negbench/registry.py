"""Registries of samplers and tasks (DESIGN §5), in the manner of torchvision's model registry.

Built-ins are every module of ``negbench.samplers`` / ``negbench.tasks`` (adding one is one
file); third-party components come through the entry-point groups ``negbench.samplers`` and
``negbench.tasks``, or ``--plugin path.py``. A module that fails to import is recorded with its
error and listed as broken; it never breaks the others.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
import traceback
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

from negbench.errors import UserError, suggest

T = TypeVar("T")


def _one_line_error(exc: BaseException) -> str:
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


class Registry(Generic[T]):
    """Name → class, with aliases, lazy discovery of built-ins and plugins, and import errors."""

    def __init__(self, kind: str, package: str, group: str) -> None:
        self.kind = kind
        self.package = package
        self.group = group
        self._classes: dict[str, type[T]] = {}
        self._aliases: dict[str, str] = {}
        self.failures: dict[str, str] = {}
        self._discovered = False

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            for key in (name, *aliases):
                owner = self._classes.get(key) or self._classes.get(self._aliases.get(key, ""))
                if owner is not None and owner.__qualname__ != cls.__qualname__:
                    raise ValueError(f"{self.kind} name {key!r} is already registered by {owner!r}")
            setattr(cls, "name", name)  # T is any registered class: set without a typed attribute
            setattr(cls, "aliases", tuple(aliases))
            self._classes[name] = cls
            for alias in aliases:
                self._aliases[alias] = name
            return cls

        return decorator

    def discover(self) -> None:
        """Import the built-in modules and the entry points once."""
        if self._discovered:
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                self._import(f"{self.package}.{info.name}", info.name)
        for entry in entry_points(group=self.group):
            try:
                loaded = entry.load()
                if isinstance(loaded, type) and loaded.__name__ not in self._classes:
                    self.register(entry.name)(loaded)
            except Exception as exc:  # a broken plugin must not break the others
                self.failures[entry.name] = _one_line_error(exc)

    def _import(self, module: str, label: str) -> None:
        try:
            importlib.import_module(module)
        except Exception as exc:
            self.failures[label] = _one_line_error(exc)

    def load_plugin(self, path: str | Path) -> None:
        """Import a plugin file whose ``@register_*`` decorators add components."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"plugin file {str(path)!r} does not exist; pass --plugin PATH.py")
        name = plugin_module_name(path)
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise UserError(f"plugin {str(path)!r} is not a Python file; pass --plugin PATH.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            self.failures[path.name] = _one_line_error(exc)

    def canonical(self, name: str) -> str:
        self.discover()
        return self._aliases.get(name, name)

    def get_class(self, name: str) -> type[T]:
        key = self.canonical(name)
        if key in self._classes:
            return self._classes[key]
        if key in self.failures:
            raise UserError(f"{self.kind} {name!r} failed to import: {self.failures[key]}")
        known = sorted([*self._classes, *self._aliases])
        raise UserError(
            f"unknown {self.kind} {name!r}{suggest(name, known)}; "
            f"`negbench list {self.kind}s` shows the {len(self._classes)} available"
        )

    def create(self, name: str, **params: Any) -> T:
        return self.get_class(name)(**params)

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._classes)


SAMPLERS: Registry[Any] = Registry("sampler", "negbench.samplers", "negbench.samplers")
TASKS: Registry[Any] = Registry("task", "negbench.tasks", "negbench.tasks")


def register_sampler(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[type[T]], type[T]]:
    """Class decorator: ``@register_sampler("emc2")`` makes the sampler available by name."""
    return SAMPLERS.register(name, aliases=aliases)


def register_task(name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[type[T]], type[T]]:
    """Class decorator: ``@register_task("digits")`` makes the task available by name."""
    return TASKS.register(name, aliases=aliases)


def get_sampler(name: str, **params: Any) -> Any:
    """A new, unbound sampler by name or alias.

    Args:
        name: a registered sampler name or alias (``negbench list samplers``).
        **params: the sampler's parameters (validated; unknown names are an error).

    Returns:
        The sampler; a run binds it to its task with :meth:`Sampler.bind`.

    Raises:
        UserError: an unknown name (close ones suggested) or a bad parameter.

    Example:
        >>> sampler = get_sampler("emc2", burn_in=0.5)
        >>> sampler.name, sampler.burn_in
        ('emc2', 0.5)
    """
    return SAMPLERS.create(name, **params)


def get_task(name: str, **params: Any) -> Any:
    """A new (not yet loaded) task by name, e.g. ``get_task("synthetic", num_items=256)``."""
    return TASKS.create(name, **params)


def list_samplers() -> list[str]:
    """Names of the registered samplers (aliases not included)."""
    return SAMPLERS.names()


def list_tasks() -> list[str]:
    """Names of the registered tasks."""
    return TASKS.names()


def plugin_module_name(path: str | Path) -> str:
    """The module name a plugin file is imported under."""
    return f"negbench_plugin_{Path(path).stem}"


def registered_by(path: str | Path) -> tuple[list[str], list[str]]:
    """The (sampler, task) names the loaded plugin file ``path`` registered."""
    module = plugin_module_name(path)

    def mine(registry: Registry[Any]) -> list[str]:
        return [n for n in registry.names() if registry.get_class(n).__module__ == module]

    return mine(SAMPLERS), mine(TASKS)


def load_plugin(path: str | Path) -> None:
    """Import a file that registers samplers and/or tasks; its import error is recorded."""
    SAMPLERS.discover()
    TASKS.discover()
    before = set(SAMPLERS.failures)
    SAMPLERS.load_plugin(path)
    new = set(SAMPLERS.failures) - before
    for key in new:  # one record is enough; show it under tasks too
        TASKS.failures[key] = SAMPLERS.failures[key]
