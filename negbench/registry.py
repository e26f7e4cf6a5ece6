"""Registries of samplers and tasks (DESIGN §5), in the manner of torchvision's model registry.

Built-ins are every module of ``negbench.samplers`` / ``negbench.tasks`` (adding one is one
file); third-party components come through the entry-point groups ``negbench.samplers`` and
``negbench.tasks``, or ``--plugin path.py``. A module that fails to import is recorded with its
error and listed as broken; it never breaks the others.

Trust (issue 17). A plugin (``--plugin`` file or entry point) that fails to import is an
error for the commands that use components (``run``, ``compare``, ``bench``): one line naming
the file, the line and the exception (:func:`plugin_errors`); ``list`` shows it instead.
Registering a name (or alias) that is taken — by a built-in or another plugin — raises
:class:`RegistrationError` naming both places, unless the decorator is given
``override=True``, which replaces the component and is recorded in ``Registry.overrides``
(``negbench list`` shows it). Re-running the same module (the same plugin file loaded twice in
one process) replaces its own classes silently.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
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


class RegistrationError(UserError):
    """A component registered under a name (or alias) that another one already has."""


def _where(cls: type) -> str:
    """``module.Class (file line N)`` of a registered class, as far as it can be found."""
    origin = getattr(cls, "_registered_at", None)
    if origin is None:
        try:
            origin = f"{inspect.getsourcefile(cls)} line {inspect.getsourcelines(cls)[1]}"
        except (OSError, TypeError):
            origin = "unknown file"
    return f"{cls.__module__}.{cls.__qualname__} ({origin})"


def _plugin_line(exc: BaseException, path: Path) -> int | None:
    """The line of ``path`` where ``exc`` arose: a syntax error's line, or the innermost
    traceback frame in that file."""
    if isinstance(exc, SyntaxError) and exc.filename and Path(exc.filename) == path:
        return exc.lineno
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename) == path:
            line = frame.lineno
    return line


class Registry(Generic[T]):
    """Name → class, with aliases, lazy discovery of built-ins and plugins, and import errors."""

    def __init__(self, kind: str, package: str, group: str) -> None:
        self.kind = kind
        self.package = package
        self.group = group
        self._classes: dict[str, type[T]] = {}
        self._aliases: dict[str, str] = {}
        self.failures: dict[str, str] = {}
        #: label → the one-line error of a plugin (file or entry point) that failed to import
        self.plugin_failures: dict[str, str] = {}
        #: name → the place of the component an ``override=True`` registration replaced
        self.overrides: dict[str, str] = {}
        self._discovered = False

    def register(self, name: str, *, aliases: tuple[str, ...] = (),
                 override: bool = False) -> Callable[[type[T]], type[T]]:
        """Class decorator registering ``cls`` as ``name`` (and ``aliases``). A name that is
        taken raises :class:`RegistrationError` naming both places, unless ``override``."""
        caller = sys._getframe(1)  # where the decorator is written (outside this file), for errors
        while caller.f_back is not None and caller.f_code.co_filename == __file__:
            caller = caller.f_back
        here = f"{Path(caller.f_code.co_filename).name} line {caller.f_lineno}"

        def decorator(cls: type[T]) -> type[T]:
            for key in (name, *aliases):
                owner = self._classes.get(key) or self._classes.get(self._aliases.get(key, ""))
                same = owner is not None and (owner.__module__, owner.__qualname__) == (cls.__module__, cls.__qualname__)
                if owner is None or same:
                    continue
                if not override:
                    raise RegistrationError(
                        f"{self.kind} {key!r} is already registered by {_where(owner)}; {here} registers it "
                        f"again; choose another name, or pass override=True to replace it"
                    )
                self.overrides[key] = _where(owner)
            setattr(cls, "_registered_at", here)  # T is any registered class: set without a typed attribute
            setattr(cls, "name", name)
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
                if isinstance(loaded, type) and getattr(loaded, "name", None) != entry.name:
                    self.register(entry.name)(loaded)
            except Exception as exc:  # a broken plugin must not break the others
                error = str(exc) if isinstance(exc, RegistrationError) else _one_line_error(exc)
                self.failures[entry.name] = error
                self.plugin_failures[entry.name] = (
                    f"entry point {entry.name!r} ({entry.value}, group {self.group}) failed to import: {error}; "
                    "fix or uninstall the package that provides it"
                )

    def _import(self, module: str, label: str) -> None:
        try:
            importlib.import_module(module)
        except Exception as exc:
            self.failures[label] = _one_line_error(exc)

    def load_plugin(self, path: str | Path) -> str | None:
        """Import a plugin file whose ``@register_*`` decorators add components; returns the
        one-line error when it fails (also recorded in ``failures``), else None."""
        path = Path(path).resolve() if Path(path).is_file() else Path(path)
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
            if isinstance(exc, RegistrationError):
                error = str(exc)
            else:
                line = _plugin_line(exc, path)
                error = f"plugin {path.name}{f' line {line}' if line else ''}: {_one_line_error(exc)}"
            self.failures[path.name] = error
            self.plugin_failures[path.name] = error
            return error
        self.failures.pop(path.name, None)
        self.plugin_failures.pop(path.name, None)
        return None

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


def register_sampler(name: str, *, aliases: tuple[str, ...] = (), override: bool = False) -> Callable[[type[T]], type[T]]:
    """Class decorator: ``@register_sampler("emc2")`` makes the sampler available by name. A
    name already taken is a :class:`RegistrationError` unless ``override=True``."""
    return SAMPLERS.register(name, aliases=aliases, override=override)


def register_task(name: str, *, aliases: tuple[str, ...] = (), override: bool = False) -> Callable[[type[T]], type[T]]:
    """Class decorator: ``@register_task("digits")`` makes the task available by name. A
    name already taken is a :class:`RegistrationError` unless ``override=True``."""
    return TASKS.register(name, aliases=aliases, override=override)


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


def load_plugin(path: str | Path, *, strict: bool = True) -> None:
    """Import a file that registers samplers and/or tasks. Its import error is recorded (and
    listed by ``negbench list``); with ``strict`` (the default, and what ``run``, ``compare``
    and ``bench`` use) it is also raised as a one-line :class:`UserError` naming the file, the
    line and the exception."""
    SAMPLERS.discover()
    TASKS.discover()
    error = SAMPLERS.load_plugin(path)
    label = Path(path).name
    if error is None:
        TASKS.failures.pop(label, None)
        TASKS.plugin_failures.pop(label, None)
        return
    TASKS.failures[label] = SAMPLERS.failures[label]  # one record is enough; show it under tasks too
    if strict:
        raise UserError(f"{error}; fix the file or leave out --plugin {path}")


def plugin_errors() -> None:
    """Raise a one-line :class:`UserError` for the first plugin entry point that failed to
    import (``--plugin`` files raise in :func:`load_plugin`)."""
    for registry in (SAMPLERS, TASKS):
        registry.discover()
        for label, error in registry.plugin_failures.items():
            if not label.endswith(".py"):
                raise UserError(error)
