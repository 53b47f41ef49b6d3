"""Old import path: ``rcm_core.embedded.text`` is :mod:`rcm_core.teachers.embedded.text` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.teachers.embedded import text as _new

sys.modules[__name__] = _new
