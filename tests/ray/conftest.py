"""Private Ray clusters for the Ray tests (never attached to a stray cluster; private, short temp dirs), and a local
S3 server (moto, on 127.0.0.1) standing in for an object store."""

import contextlib
import logging
import os

import pytest

from ccr_ray.net import free_port
from tests.conftest import private_ray

pytestmark = pytest.mark.ray
BUCKET = "ccr-test"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def ray_local():
    with private_ray() as ray:
        yield ray


class MotoS3:
    """A moto S3 server on loopback with a bucket; `root` is s3://ccr-test/ccr?... on it. `stop()` and `start()`
    take it down and bring it back on the same port with the same objects (moto keeps them in this process)."""

    def __init__(self, port: int | None = None):
        from ccr_ray.storage import Location

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server logs every request
        self.port = port or free_port()
        self.server = None
        self.root = Location.of(f"s3://{BUCKET}/ccr?endpoint_override=127.0.0.1:{self.port}&scheme=http"
                                "&region=us-east-1&allow_bucket_creation=true")

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@contextlib.contextmanager
def moto_s3():
    """A started MotoS3 with an empty bucket. The fake credentials go into this process's environment (Ray
    processes started later inherit them)."""
    s3 = MotoS3()
    s3.start()
    saved = {k: os.environ.get(k) for k in AWS}
    os.environ.update(AWS)
    s3.root.fs.create_dir(BUCKET)
    try:
        yield s3
    finally:
        s3.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def s3():
    """moto S3 + a private local Ray whose processes carry the credentials."""
    with moto_s3() as server, private_ray("ccrs3-", env=AWS):
        yield server.root
