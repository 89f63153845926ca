"""Private Ray clusters for the Ray tests (never attached to a stray cluster; private, short temp dirs), and a local
S3 server (moto, on 127.0.0.1) standing in for an object store."""

import contextlib
import logging
import os

import pytest

from ccr_ray.net import free_port
from ccr_ray.ray_utils import environment
from tests.conftest import private_ray

pytestmark = pytest.mark.ray
BUCKET = "ccr-test"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def train_logs_tail(lines: int = 60) -> str:
    """The last lines of Ray Train's controller and worker system logs of the connected cluster, for a failure
    message (a private cluster's logs are deleted with it; a Train run that fails in its start-up leaves the why
    there, e.g. who removed its placement group)."""
    import glob
    import json

    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    if node is None:
        return "(no Ray node in this process)"
    out = []
    for path in sorted(glob.glob(os.path.join(node.get_session_dir_path(), "logs", "train", "ray-train-sys-*.log")),
                       key=os.path.getmtime)[-4:]:
        records = []
        for line in open(path, errors="replace").read().splitlines()[-lines:]:
            try:
                record = json.loads(line)
                records.append(f"{record['asctime']} {record['levelname']} {record['message'][:400]}")
            except (ValueError, KeyError):
                records.append(line[:400])
        out.append(f"--- {os.path.basename(path)}\n" + "\n".join(records))
    # Train's detached PlacementGroupCleaner logs to its own worker files: the line that says it removed a group
    for path in glob.glob(os.path.join(node.get_session_dir_path(), "logs", "worker-*")):
        found = [line[:400] for line in open(path, errors="replace") if "placement group" in line.lower()]
        if found:
            out.append(f"--- {os.path.basename(path)}\n" + "".join(found[-5:]))
    # a worker that died without a Python exception ("connection error code 2. End of file"): Ray enables
    # faulthandler in workers, so a segfault or abort leaves its stack in the worker's .err file; the raylet says
    # how the process ended
    for path in glob.glob(os.path.join(node.get_session_dir_path(), "logs", "worker-*.err")):
        text = open(path, errors="replace").read()
        if any(sign in text for sign in CRASH_SIGNS):
            out.append(f"--- {os.path.basename(path)}\n{text[-3000:]}")
    raylet = os.path.join(node.get_session_dir_path(), "logs", "raylet.out")
    if os.path.exists(raylet):
        found = [line[:400] for line in open(raylet, errors="replace")
                 if "exit" in line.lower() and ("signal" in line.lower() or "SYSTEM_ERROR" in line)]
        if found:
            out.append("--- raylet.out\n" + "".join(found[-8:]))
    return "\n".join(out) or "(no Ray Train logs)"


CRASH_SIGNS = ("Fatal Python error", "Segmentation fault", "terminate called", "Aborted", "Killed",
               "MemoryError")


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
    try:
        with environment(AWS):
            s3.root.fs.create_dir(BUCKET)
            yield s3
    finally:
        s3.stop()


@pytest.fixture(scope="module")
def s3():
    """moto S3 + a private local Ray whose processes carry the credentials."""
    with moto_s3() as server, private_ray("ccrs3-", env=AWS):
        yield server.root
