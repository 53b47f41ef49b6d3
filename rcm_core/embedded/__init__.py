"""Old import path of :mod:`rcm_core.teachers.embedded` (the embedded moving-digit teacher); its submodules
``rcm_core.embedded.<name>`` are the new modules themselves."""
from rcm_core.teachers.embedded import *  # noqa: F401,F403
from rcm_core.teachers.embedded import __all__, dit, text  # noqa: F401
