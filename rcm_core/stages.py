"""Old import path: ``rcm_core.stages`` is :mod:`rcm_core.method.stages` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.method import stages as _new

sys.modules[__name__] = _new
