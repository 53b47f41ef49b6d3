"""Old import path: ``rcm_core.denoiser`` is :mod:`rcm_core.nets.denoiser` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.nets import denoiser as _new

sys.modules[__name__] = _new
