"""Cache self-repair: a shard that does not match its checksum is recomputed (logged, counted),
bit-identically; a manifest written for another request is an error naming both.

Local storage and a real S3 protocol endpoint (moto server on 127.0.0.1).
"""
from __future__ import annotations

import pytest

from pipeline_fixtures import *  # noqa: F401,F403
from pipeline_fixtures import FakeTeacher
from rcm_steps.cache import CacheConfig, cache_teacher, load_cache
from rcm_steps.storage import SHARD_MANIFEST, ShardError, Storage

PROMPTS = [f"p{i}" for i in range(5)]
CFG = CacheConfig(samples_per_prompt=3, shard_size=4)          # 15 samples -> 4 shards


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "s3":
        url, opts = request.getfixturevalue("s3_bucket")
        return Storage(url + "/root", opts)
    return Storage(str(tmp_path / "root"))


def test_corrupt_and_missing_shards_are_recomputed_bit_identically(root, capfd):
    teacher = FakeTeacher()
    first = cache_teacher(teacher, PROMPTS, root, CFG)
    assert first.stats["repaired_shards"] == 0 and first.repaired == {}
    loc = Storage(first.url, root.storage_options)
    original = {n: loc.read_bytes(f"{n}.safetensors") for n in ("uncond", "shard-00001", "shard-00003")}
    loc.write_bytes("shard-00001.safetensors", original["shard-00001"][:-10] + b"\0" * 10)   # bit rot
    loc.write_bytes("uncond.safetensors", b"garbage")
    loc.rm("shard-00003.safetensors")                           # listed in the manifest, file gone
    with pytest.raises(ShardError, match="shard 'shard-00001' is corrupt") as e:
        load_cache(first.url)                                   # what distill sees: an error saying what to do
    assert "recomputes those that do not match" in e.value.fix
    capfd.readouterr()

    again = cache_teacher(teacher, PROMPTS, root, CFG)
    assert set(again.repaired) == {"uncond", "shard-00001", "shard-00003"}
    assert again.stats["repaired_shards"] == 3 and again.computed_shards == 2 and again.skipped_shards == 2
    assert again.repaired["shard-00001"].startswith("corrupt: sha256 of ")
    assert again.repaired["shard-00003"].startswith("missing: ")
    err = capfd.readouterr().err
    assert "cache: shard-00001 is corrupt" in err and "recomputing it" in err and "cache: uncond is corrupt" in err
    for n, data in original.items():                            # the same bytes as the first time
        assert loc.read_bytes(f"{n}.safetensors") == data, n
    assert again.data_hash == first.data_hash and again.report.success
    assert load_cache(first.url).latents.shape == (15, *teacher.latent_shape)
    clean = cache_teacher(teacher, PROMPTS, root, CFG)          # nothing left to repair
    assert clean.repaired == {} and clean.computed_shards == 0 and clean.data_hash == first.data_hash


def test_manifest_for_another_request_names_both(root):
    teacher = FakeTeacher()
    first = cache_teacher(teacher, PROMPTS, root, CFG)
    loc = Storage(first.url, root.storage_options)
    manifest = loc.read_json(SHARD_MANIFEST)
    manifest["spec"] = {**manifest["spec"], "seed": 7, "steps": 99}
    loc.write_json(SHARD_MANIFEST, manifest)
    before = {n: loc.read_bytes(n) for n in loc.list() if n.endswith(".safetensors")}
    with pytest.raises(ShardError) as e:
        cache_teacher(teacher, PROMPTS, root, CFG)
    msg = str(e.value)
    assert f"manifest {loc.url(SHARD_MANIFEST)} does not match this request" in msg
    assert "field 'seed': manifest 7, request 0" in msg and "field 'steps': manifest 99, request 4" in msg
    assert "move the folder away" in e.value.fix
    assert {n: loc.read_bytes(n) for n in loc.list() if n.endswith(".safetensors")} == before   # nothing lost
    loc.write_bytes(SHARD_MANIFEST, b"{not json")
    with pytest.raises(ShardError, match=r"manifest.json is not valid JSON") as e:
        cache_teacher(teacher, PROMPTS, root, CFG)
    assert "delete that folder" in e.value.fix


def test_flow_recomputes_a_corrupt_shard_and_goes_on(tmp_path):
    """The issue's case: a corrupt shard stopped every retry; now the next run repairs it and finishes."""
    from pipeline_fixtures import run_flow

    run1, _, err1 = run_flow(tmp_path)
    assert run1.successful, err1[-3000:]
    loc = Storage(run1.data.cache_url)
    good = loc.read_bytes("shard-00001.safetensors")
    loc.write_bytes("shard-00001.safetensors", good[:-4] + b"\xff\xff\xff\xff")
    run2, _, err2 = run_flow(tmp_path)
    assert run2.successful, err2[-3000:]
    assert run2.data.cache_url == run1.data.cache_url and run2.data.data_hash == run1.data.data_hash
    assert run2.data.cache_summary["repaired_shards"] == 1 and run2.data.cache_summary["computed_shards"] == 1
    assert loc.read_bytes("shard-00001.safetensors") == good
    assert "cache: shard-00001 is corrupt" in err2

