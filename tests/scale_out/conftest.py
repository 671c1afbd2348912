"""Fixtures of the scale-out tests: one small cache written by a single process (what every other way of
building it must equal) and an S3-compatible store served on loopback by moto.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from conftest import cli

from .helpers import BUCKET, scale_cache_config, torchrun


@pytest.fixture(scope="session")
def reference_cache(tmp_path_factory, assets) -> str:
    """The cache one process writes on a local disk: what every other way of building it must equal."""
    root = tmp_path_factory.mktemp("reference_cache")
    config = scale_cache_config(root, assets, str(root / "cache"))
    cli("-q", "cache-teacher", "--config", config)
    return json.loads(Path(config).read_text())["cache"]["path"]


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """An S3-compatible store on 127.0.0.1 (moto's ThreadedMotoServer) with an empty bucket; yields a callable
    giving a fresh s3:// URL per name. The AWS_* variables point every client here, in this process and in the
    torchrun workers it starts (AWS_ENDPOINT_URL is how a user points sad-pipe at MinIO or similar too)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    nowhere = str(tmp_path_factory.mktemp("aws") / "none")  # never a real profile or credentials
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_CONFIG_FILE": nowhere, "AWS_SHARED_CREDENTIALS_FILE": nowhere}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_SESSION_TOKEN", "AWS_PROFILE"]}
    os.environ.update(env)
    for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
        os.environ.pop(k, None)
    try:
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir(BUCKET)
        names: set[str] = set()

        def url(name: str) -> str:
            assert name not in names, f"s3 name {name} used twice in this session"
            names.add(name)
            return f"s3://{BUCKET}/{name}"

        yield url
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_cache(tmp_path_factory, assets, s3) -> str:
    """The same cache written to the object store by two torchrun ranks."""
    url = s3("two-ranks")
    torchrun(2, "cache-teacher", "--config", scale_cache_config(tmp_path_factory.mktemp("s3_cache"), assets, url))
    return url
