"""Old import path: ``rcm_core.scheduler`` is :mod:`rcm_core.export.scheduler` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.export import scheduler as _new

sys.modules[__name__] = _new
