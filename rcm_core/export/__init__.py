"""Export: a distilled student as a diffusers pipeline directory (``pipeline``), its model card (``card``) and
the few-step scheduler it ships with (``scheduler``). ``rcm_core.export`` keeps the API it had as one module
(``from rcm_core.export import export_student``)."""
from .card import *  # noqa: F401,F403
from .card import _CARD_KEYS, _fmt, _timesteps, eval_table, model_card  # noqa: F401
from .pipeline import *  # noqa: F401,F403
from .pipeline import (_WAN_BLOCK, _WAN_TOP, SCHEDULER_ENTRY, _build_transformer, _component_names,  # noqa: F401
                       _dtype_kw, _experts_of, _files_of, _link_or_copy, _load_state, _read_json, _sanitize,
                       _variant_of, split_expert_state)
from .pipeline import __all__ as _pipeline_all

__all__ = [*_pipeline_all, "model_card"]
