"""Old import path: ``rcm_core.embedded.train`` is :mod:`rcm_core.teachers.embedded.train` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.teachers.embedded import train as _new

sys.modules[__name__] = _new

if __name__ == "__main__":
    _new.main()
