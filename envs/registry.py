"""Where environments are found by name: the `register_env` decorator and the `codeworld.envs`
entry-point group, so a separate pip package can add environments without touching codeworld."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

from envs.base import Environment

ENTRY_POINT_GROUP = "codeworld.envs"

_REGISTRY: dict[str, type[Environment]] = {}
_builtins_loaded = False


def register_env(name: str) -> Callable[[type[Environment]], type[Environment]]:
    """Class decorator: make an `Environment` subclass available as `name` in run configs."""

    def decorate(cls: type[Environment]) -> type[Environment]:
        if not (isinstance(cls, type) and issubclass(cls, Environment)):
            raise TypeError(f"@register_env({name!r}) must decorate an Environment subclass.")
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(
                f"Environment name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}."
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _load_all() -> None:
    """Import the built-in environments and every installed entry point, once."""
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    import envs.builtin  # noqa: F401  (registers the built-in environments)

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        loaded = ep.load()
        if isinstance(loaded, type) and issubclass(loaded, Environment) and ep.name not in _REGISTRY:
            register_env(ep.name)(loaded)


def get_env(name: str) -> type[Environment]:
    """The environment class registered as `name`."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise KeyError(f"Unknown environment {name!r}; registered: {known}.") from None


def list_envs() -> dict[str, type[Environment]]:
    """All registered environments by name."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))
