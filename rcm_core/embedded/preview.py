"""Old import path: ``rcm_core.embedded.preview`` is :mod:`rcm_core.teachers.embedded.preview` (the same module object, so imports,
monkeypatches and pickles that name the old path keep working)."""
import sys

from rcm_core.teachers.embedded import preview as _new

sys.modules[__name__] = _new

if __name__ == "__main__":
    _new.main()
