"""Old import path: ``rcm_core.real.time_embedding`` is :mod:`rcm_core.teachers.real.time_embedding` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.teachers.real import time_embedding as _new

sys.modules[__name__] = _new
