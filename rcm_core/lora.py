"""Old import path: ``rcm_core.lora`` is :mod:`rcm_core.nets.lora` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.nets import lora as _new

sys.modules[__name__] = _new
