"""Teacher registry: ``list_teachers()`` / ``get_teacher(name, **options)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from mocha_edge.errors import TeacherError
from mocha_edge.teachers.base import Teacher

_REGISTRY: dict[str, Callable[..., Teacher]] = {}


def register(name: str) -> Callable[[Callable[..., Teacher]], Callable[..., Teacher]]:
    """Class decorator adding a teacher factory under ``name``."""

    def deco(factory: Callable[..., Teacher]) -> Callable[..., Teacher]:
        _REGISTRY[name] = factory
        return factory

    return deco


def _load_builtins() -> None:
    # Importing the modules registers them; heavy libraries (transformers) are imported lazily inside.
    from mocha_edge.teachers import builtin, hf  # noqa: F401


def list_teachers() -> list[str]:
    """Names accepted by :func:`get_teacher` and ``mocha-edge teach --teacher``."""
    _load_builtins()
    return sorted(_REGISTRY)


def teacher_options(name: str) -> set[str]:
    """Keyword options the teacher registered as ``name`` accepts."""
    _load_builtins()
    if name not in _REGISTRY:
        raise TeacherError(f"unknown teacher {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return set(inspect.signature(_REGISTRY[name]).parameters)


def check_teacher_options(name: str, options: Any) -> Callable[..., Teacher]:
    """The factory registered as ``name`` once it is known to accept ``options`` (names); else :class:`TeacherError`."""
    _load_builtins()
    if name not in _REGISTRY:
        raise TeacherError(f"unknown teacher {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    factory = _REGISTRY[name]
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        extra = sorted(set(options) - set(params))
        if extra:
            raise TeacherError(
                f"teacher {name!r} does not take {', '.join(extra)}; it takes: {', '.join(params) or 'nothing'}"
            )
    return factory


def get_teacher(name: str, **options: Any) -> Teacher:
    """Build the teacher registered as ``name``; unknown names list the valid ones."""
    return check_teacher_options(name, options)(**options)


__all__ = ["Teacher", "check_teacher_options", "get_teacher", "list_teachers", "register", "teacher_options"]
