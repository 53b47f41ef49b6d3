"""Old import path: ``rcm_core.trigflow`` is :mod:`rcm_core.method.trigflow` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.method import trigflow as _new

sys.modules[__name__] = _new
