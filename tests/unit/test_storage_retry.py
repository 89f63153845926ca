"""The storage layer's retries (ccr_ray.storage.RetryingHandler): an object store that is unreachable for a while
delays an operation instead of failing it; once the budget is spent the error is one line naming the budget;
errors that are not outages fail at once. The inner filesystem here is the local disk behind a handler that fails
the way pyarrow's S3 client does while the server is down."""

import pickle
import time

import pyarrow.fs as pafs
import pytest

from ccr_ray.storage import Location, RetryingHandler, StorageUnreachable, is_transient, with_retries

DOWN = ("When initiating multiple part upload for key 'x' in bucket 'b': AWS Error NETWORK_CONNECTION during "
        "CreateMultipartUpload operation: curlCode: 7, Could not connect to server")


class Outage(pafs.FileSystemHandler):
    """The local disk under `root`, failing the next `failures` operations as an unreachable S3 does."""

    def __init__(self, root: str, failures: int = 0):
        self.inner = pafs.SubTreeFileSystem(root, pafs.LocalFileSystem())
        self.failures, self.calls = failures, []

    def _op(self, name, fn, *args, **kwargs):
        self.calls.append(name)
        if self.failures > 0:
            self.failures -= 1
            raise OSError(DOWN)
        return fn(*args, **kwargs)

    def get_type_name(self):
        return "outage"

    def equals(self, other):
        return other is self

    def normalize_path(self, path):
        return path

    def get_file_info(self, paths):
        return self._op("stat", self.inner.get_file_info, paths)

    def get_file_info_selector(self, selector):
        return self._op("list", self.inner.get_file_info, selector)

    def create_dir(self, path, recursive):
        return self._op("mkdir", self.inner.create_dir, path, recursive=recursive)

    def delete_dir(self, path):
        return self._op("delete", self.inner.delete_dir, path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        return self._op("delete", self.inner.delete_dir_contents, path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        return self._op("delete", self.inner.delete_file, path)

    def move(self, src, dest):
        return self._op("move", self.inner.move, src, dest)

    def copy_file(self, src, dest):
        return self._op("copy", self.inner.copy_file, src, dest)

    def open_input_stream(self, path):
        return self._op("read", self.inner.open_input_stream, path)

    def open_input_file(self, path):
        return self._op("read", self.inner.open_input_file, path)

    def open_output_stream(self, path, metadata):
        return self._op("write", self.inner.open_output_stream, path)

    def open_append_stream(self, path, metadata):
        raise NotImplementedError


def flaky(tmp_path, failures: int, budget: float, **kw):
    outage = Outage(str(tmp_path), failures)
    retries: list[str] = []
    handler = RetryingHandler(pafs.PyFileSystem(outage), budget, on_retry=lambda what, *_: retries.append(what), **kw)
    return outage, pafs.PyFileSystem(handler), retries


def test_an_outage_within_the_budget_only_delays_reads_writes_and_listings(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)  # the backoff is not what is tested here
    outage, fs, retries = flaky(tmp_path, failures=3, budget=60)
    with fs.open_output_stream("a.txt") as f:  # the upload happens on close: retried whole
        f.write(b"hello ")
        f.write(b"world")
    assert (tmp_path / "a.txt").read_bytes() == b"hello world"
    assert retries == ["write"] * 3
    outage.failures = 2
    with fs.open_input_stream("a.txt") as f:
        assert f.read() == b"hello world"
    outage.failures = 2
    assert [i.base_name for i in fs.get_file_info(pafs.FileSelector("", recursive=True))] == ["a.txt"]
    assert retries == ["write"] * 3 + ["read"] * 2 + ["list"] * 2


def test_a_spent_budget_is_one_line_naming_it(tmp_path):
    _, fs, retries = flaky(tmp_path, failures=10 ** 6, budget=0.2)
    with pytest.raises(StorageUnreachable) as caught:
        with fs.open_output_stream("ckpt/state.json") as f:
            f.write(b"{}")
    message = str(caught.value)
    assert "\n" not in message and "run.storage_retry_s=0.2" in message and "ckpt/state.json" in message
    assert "NETWORK_CONNECTION" in message and retries
    assert not (tmp_path / "ckpt" / "state.json").exists()  # nothing half-written


def test_errors_that_are_not_outages_fail_at_once(tmp_path):
    outage, fs, retries = flaky(tmp_path, failures=0, budget=60)
    with pytest.raises(FileNotFoundError):
        fs.open_input_stream("missing")
    assert retries == [] and outage.calls == ["read"]
    assert not is_transient(OSError("AWS Error ACCESS_DENIED during PutObject operation"))
    assert is_transient(OSError(DOWN))


def test_remote_locations_retry_local_ones_do_not_and_the_budget_travels(tmp_path):
    assert isinstance(Location.of(tmp_path).fs, pafs.LocalFileSystem)
    assert with_retries(pafs.LocalFileSystem(), 5).type_name == "local"
    remote = Location.of("s3://bucket/runs?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1")
    assert isinstance(remote.fs.handler, RetryingHandler)
    short = (remote / "x").with_retry(7.5)
    assert short.fs.handler.budget_s == 7.5 and short.uri.endswith("/runs/x?endpoint_override=127.0.0.1:1&scheme="
                                                                     "http&region=us-east-1")
    again = pickle.loads(pickle.dumps(short.fs))  # Ray Train ships the filesystem to its controller and workers
    assert again.handler.budget_s == 7.5 and isinstance(again.handler.fs, pafs.S3FileSystem)  # rewrapped, not nested


def test_on_s3_a_folder_upload_rides_through_an_outage_and_many_files_do_not_deadlock(tmp_path):
    """moto S3 on loopback: 24 files at once through the retrying layer (pyarrow's copy_files runs the handler on
    its IO threads; with S3's background writes that deadlocked from 8 files on), then the server stopped before
    an upload and started again once the upload has retried (an event, not a sleep)."""
    import threading

    from tests.ray.conftest import moto_s3

    folder = tmp_path / "ckpt"
    folder.mkdir()
    for i in range(24):
        (folder / f"part-{i:02d}.bin").write_bytes(bytes([i]) * 1000)
    with moto_s3() as server:
        first = server.root / "first"
        first.upload_from(folder)
        assert len(first.walk_files()) == 24
        retried = threading.Event()
        target = server.root / "second"
        target.fs.handler.on_retry = lambda *_: retried.set()
        server.stop()
        box = {}
        upload = threading.Thread(target=lambda: box.update(done=target.upload_from(folder) or True), daemon=True)
        upload.start()
        assert retried.wait(120), "the upload never met the outage"
        server.start()
        upload.join(300)
        assert box.get("done") and sorted(n for n, _ in target.walk_files()) == sorted(p.name for p in
                                                                                      folder.iterdir())
