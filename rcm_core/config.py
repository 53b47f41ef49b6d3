"""Old import path: ``rcm_core.config`` is :mod:`rcm_core.method.config` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.method import config as _new

sys.modules[__name__] = _new
