"""Imports every built-in environment module so that their `@register_env` decorators run."""

import envs.arithmetic  # noqa: F401
