import os

import pytest
import torch

from pipeline_fixtures import *  # noqa: F401,F403
from rcm_steps.storage import ShardError, ShardSet, Storage, StorageError


def _roundtrip(root, opts=None):
    st = Storage(root, opts)
    st.write_bytes("a/b.txt", b"hello")
    assert st.read_bytes("a/b.txt") == b"hello"
    assert st.list("a") == ["b.txt"]
    shards = ShardSet.open(st.child("cache"), spec={"x": 1})
    t = {"latents": torch.randn(3, 1, 2, 4, 4), "cond": torch.randn(3, 5, 8)}
    shards.write("shard-00000", t)
    again = ShardSet.open(st.child("cache"), spec={"x": 1})
    assert again.has("shard-00000") and not again.has("shard-00001")
    got = again.read("shard-00000", expect_shapes={"latents": [None, 1, 2, 4, 4]})
    assert torch.equal(got["latents"], t["latents"])
    assert again.manifest["total_count"] == 3
    with pytest.raises(ShardError, match="expected"):
        again.read("shard-00000", expect_shapes={"latents": [None, 1, 4, 4, 4]})
    # corrupt, then missing: the error names the shard
    st.write_bytes("cache/shard-00000.safetensors", b"garbage")
    with pytest.raises(ShardError, match="shard-00000.*corrupt"):
        again.read("shard-00000")
    st.rm("cache/shard-00000.safetensors")
    assert not again.has("shard-00000")
    with pytest.raises(ShardError, match="shard-00000.*missing"):
        again.read("shard-00000")
    with pytest.raises(ShardError, match="does not match this request: field 'x': manifest 1, request 2"):
        ShardSet.open(st.child("cache"), spec={"x": 2})
    # no temp files are left behind
    assert not [n for n in st.list("cache") if n.startswith(".tmp")]
    return st


def test_local_and_s3_one_code_path(tmp_path, s3_bucket):
    _roundtrip(str(tmp_path / "store"))
    _roundtrip("file://" + str(tmp_path / "store2"))
    url, opts = s3_bucket
    st = _roundtrip(url + "/root", opts)
    assert st.is_object_store


def test_s3_without_credentials_is_a_clear_error(monkeypatch, tmp_path):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("RCM_STORAGE_OPTIONS", raising=False)
    with pytest.raises(StorageError, match="s3://bucket/x.*credentials"):
        Storage("s3://bucket/x")


def test_remote_filesystem_is_reused_only_while_the_credentials_are_unchanged(monkeypatch, tmp_path):
    """fsspec keys its instance cache on the arguments only; url_to_fs (Storage, the watcher, checkpoints) makes a
    new S3 filesystem when the credential environment or a credential file changed, and reuses it otherwise."""
    from rcm_core.io.files import url_to_fs

    opts = {"endpoint_url": "http://127.0.0.1:9"}          # nothing is contacted: filesystems connect lazily
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAOLD")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "old")
    a, path = url_to_fs("s3://bucket/root/x", opts)
    assert path == "bucket/root/x" and url_to_fs("s3://bucket/other", opts)[0] is a
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANEW")
    b = url_to_fs("s3://bucket/root/x", opts)[0]
    assert b is not a and url_to_fs("s3://bucket/root/x", opts)[0] is b
    (tmp_path / "credentials").write_text("[default]\naws_access_key_id = AKIAFILE\n")     # a rotation agent
    assert url_to_fs("s3://bucket/root/x", opts)[0] is not b
    assert Storage("s3://bucket/root", opts).fs is url_to_fs("s3://bucket/root", opts)[0]
