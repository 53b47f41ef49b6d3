"""Old import path: ``rcm_core.mixture`` is :mod:`rcm_core.teachers.mixture` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.teachers import mixture as _new

sys.modules[__name__] = _new
