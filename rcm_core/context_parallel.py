"""Old import path: ``rcm_core.context_parallel`` is :mod:`rcm_core.parallel.context_parallel` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.parallel import context_parallel as _new

sys.modules[__name__] = _new
