"""Old import path: ``rcm_core.ema`` is :mod:`rcm_core.method.ema` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.method import ema as _new

sys.modules[__name__] = _new
