"""Teacher registry and the embedded teacher's declared parameterisation."""
import pytest
import torch

from rcm_core.denoiser import Parameterization, TrigFlowDenoiser, check_parameterization
from rcm_core.teachers import get_teacher, known_teachers


def test_unknown_teacher_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown teacher 'wan9'; known teachers: .*embedded"):
        get_teacher("wan9")
    assert "embedded" in known_teachers()


def test_embedded_teacher_is_a_rectified_flow_network():
    from rcm_core.embedded.data import make_clips, to_latent
    teacher = get_teacher("embedded")
    assert teacher.latent_shape == (1, 4, 16, 16) and teacher.param.kind == "rf"
    clips, prompts, _ = make_clips(32, seed=3)
    x0 = to_latent(clips)
    cond = teacher.encode_text(prompts)
    assert cond.shape[0] == 32 and cond.dim() == 3
    assert teacher.negative_embedding().shape == (1, *cond.shape[1:])
    errs = check_parameterization(teacher.denoiser(), x0, cond)
    assert errs["rf"] < errs["x0"] and errs["rf"] < errs["eps"]
    wrong = TrigFlowDenoiser(teacher.net, Parameterization("x0", 1000.0))
    with pytest.raises(ValueError, match="declared parameterisation 'x0' does not match.*Declare 'rf'"):
        check_parameterization(wrong, x0, cond)
    assert torch.allclose(teacher.decode(x0), clips, atol=1e-5)
