import pytest
import torch

from pipeline_fixtures import *  # noqa: F401,F403
from pipeline_fixtures import FakeTeacher
from rcm_steps.cache import CacheConfig, cache_teacher, load_cache, validate_latents
from rcm_steps.storage import ShardError, Storage
from rcm_steps.validation import DataValidationError

PROMPTS = [f"p{i}" for i in range(5)]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_cache_is_resumable_idempotent_and_verified(where, tmp_path, request):
    if where == "s3":
        url, opts = request.getfixturevalue("s3_bucket")
        st = Storage(url + "/root", opts)
    else:
        st = Storage(str(tmp_path / "root"))
    cfg = CacheConfig(samples_per_prompt=3, shard_size=4)  # 15 samples -> 4 shards
    teacher = FakeTeacher()
    part = cache_teacher(teacher, PROMPTS, st, cfg, stop_after_shards=2)   # "crash" after 2 shards
    assert part.computed_shards == 2
    full = cache_teacher(teacher, PROMPTS, st, cfg, docs_dir=str(tmp_path / "docs"))
    assert (full.computed_shards, full.skipped_shards, full.total) == (2, 2, 15)
    assert full.report.success and (tmp_path / "docs" / "index.html").exists()
    again = cache_teacher(teacher, PROMPTS, st, cfg)
    assert again.computed_shards == 0 and again.data_hash == full.data_hash
    fresh = Storage(str(tmp_path / "fresh"))
    ref = cache_teacher(teacher, PROMPTS, fresh, cfg)   # uninterrupted: same bytes, same hash
    assert ref.data_hash == full.data_hash
    data = load_cache(full.url, expect_latent_shape=teacher.latent_shape)
    assert data.latents.shape == (15, *teacher.latent_shape) and data.cond.shape == (15, 3, 8)
    assert data.uncond.shape == (1, 3, 8) and data.prompt_idx.tolist() == [i // 3 for i in range(15)]
    with pytest.raises(ShardError, match=r"expects \[1, 4, 4, 4\]"):
        load_cache(full.url, expect_latent_shape=(1, 4, 4, 4))
    loc = Storage(full.url)
    loc.write_bytes("shard-00001.safetensors", b"broken")
    with pytest.raises(ShardError, match="shard-00001.*corrupt"):
        load_cache(full.url)
    loc.rm("shard-00002.safetensors")
    with pytest.raises(ShardError, match="shard-00001"):
        load_cache(full.url)


def test_latent_gate_names_failures():
    lat = torch.randn(6, 1, 2, 4, 4)
    lat[0, 0, 0, 0, 0] = float("nan")
    lat[1] = 0.0
    with pytest.raises(DataValidationError) as ei:
        validate_latents(lat, expected_count=6, cfg=CacheConfig())
    msg = str(ei.value)
    assert "column='finite'" in msg and "column='std'" in msg and "row_count" not in msg
