"""Old import path: ``rcm_core.real.attention`` is :mod:`rcm_core.teachers.real.attention` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.teachers.real import attention as _new

sys.modules[__name__] = _new
