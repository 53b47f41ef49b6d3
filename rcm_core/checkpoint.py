"""Old import path: ``rcm_core.checkpoint`` is :mod:`rcm_core.io.checkpoint` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.io import checkpoint as _new

sys.modules[__name__] = _new
