"""Old import path: ``rcm_core.attention`` is :mod:`rcm_core.nets.attention` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.nets import attention as _new

sys.modules[__name__] = _new
