"""The test S3 server answers like any S3 endpoint configured through the standard AWS variables."""

from __future__ import annotations

import fsspec


def test_store_round_trip_through_standard_environment(s3_store, monkeypatch):
    s3_store.env(monkeypatch)
    url = s3_store.url("hello.txt")
    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(path, "wb") as f:
        f.write(b"hello")
    info = fs.info(path)
    assert info["size"] == 5
    assert info["ETag"].strip('"')  # content fingerprints come from the store
    with fs.open(path, "rb") as f:
        assert f.read() == b"hello"
