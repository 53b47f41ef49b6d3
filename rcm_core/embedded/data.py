"""Old import path: ``rcm_core.embedded.data`` is :mod:`rcm_core.teachers.embedded.data` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.teachers.embedded import data as _new

sys.modules[__name__] = _new
