"""Old import path: ``rcm_core.real.fast_vae`` is :mod:`rcm_core.teachers.real.fast_vae` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.teachers.real import fast_vae as _new

sys.modules[__name__] = _new
