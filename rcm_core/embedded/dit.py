"""Old import path: ``rcm_core.embedded.dit`` is :mod:`rcm_core.teachers.embedded.dit` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.teachers.embedded import dit as _new

sys.modules[__name__] = _new
