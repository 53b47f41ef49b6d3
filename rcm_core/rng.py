"""Old import path: ``rcm_core.rng`` is :mod:`rcm_core.method.rng` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.method import rng as _new

sys.modules[__name__] = _new
