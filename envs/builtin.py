"""Imports every built-in environment module so that their `@register_env` decorators run."""

import envs.arithmetic  # noqa: F401
import envs.code  # noqa: F401
import envs.exec_trace  # noqa: F401
import envs.selfdebug  # noqa: F401
import envs.swe.env  # noqa: F401
