"""Old import path: ``rcm_core.sampling`` is :mod:`rcm_core.method.sampling` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.method import sampling as _new

sys.modules[__name__] = _new
