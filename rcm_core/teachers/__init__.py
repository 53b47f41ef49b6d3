"""Teachers: the :class:`Teacher` contract (``base``), the named registry (``registry``, re-exported here:
``from rcm_core.teachers import get_teacher``), the embedded teacher (``embedded``), real diffusers teachers
(``real``) and the analytic Gaussian / mixture teachers (``gaussian``, ``mixture``)."""
from .base import Teacher  # noqa: F401
from .registry import (STUDENT_LAYOUTS, _REGISTRY, _embedded, _is_diffusers_dir, _real, check_student_layout,  # noqa: F401
                       expert_student, get_teacher, is_known_teacher, known_teachers, register_teacher, student_layout,
                       student_networks)
