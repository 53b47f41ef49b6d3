"""Old import path: ``rcm_core.gaussian`` is :mod:`rcm_core.teachers.gaussian` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.teachers import gaussian as _new

sys.modules[__name__] = _new
