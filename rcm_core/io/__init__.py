"""Files and checkpoints: atomic writes and reads on local paths or object stores (``files``, re-exported here
as ``rcm_core.io`` was one module) and the trainer's checkpoint formats, DCP and single file (``checkpoint``)."""
from .files import *  # noqa: F401,F403
from .files import _is_local, atomic_write_bytes, exists, read_bytes  # noqa: F401
