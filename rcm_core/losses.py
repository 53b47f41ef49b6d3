"""Old import path: ``rcm_core.losses`` is :mod:`rcm_core.method.losses` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.method import losses as _new

sys.modules[__name__] = _new
