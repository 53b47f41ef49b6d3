"""Old import path of :mod:`rcm_core.teachers.real` (real teachers through diffusers); its submodules
``rcm_core.real.<name>`` are the new modules themselves."""
from rcm_core.teachers.real import *  # noqa: F401,F403
from rcm_core.teachers.real import __all__, attention, loading, memory, specs, time_embedding  # noqa: F401
