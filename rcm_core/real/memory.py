"""Old import path: ``rcm_core.real.memory`` is :mod:`rcm_core.teachers.real.memory` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.teachers.real import memory as _new

sys.modules[__name__] = _new
