"""Old import path: ``rcm_core.real.loading`` is :mod:`rcm_core.teachers.real.loading` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.teachers.real import loading as _new

sys.modules[__name__] = _new
