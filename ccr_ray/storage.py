"""One filesystem layer for everything that may live on shared storage: runs, checkpoints, datasets, caches.

    Location.of("/data/x" | "s3://bucket/x?endpoint_override=..." | "gs://...")   a path inside a pyarrow
                                           filesystem; exists / read / write / list / delete / upload / download
    publish_folder(local, target, marker)  put a finished folder in place so no reader sees it half-written
    localize(location)                     a local path for libraries that open files by path (tokenizers,
                                           safetensors), downloaded once per node when the location is remote
    parquet_file / read_table / ray_paths  Parquet through the location's filesystem

and, for local folders and files:

    with staged_folder(target) as tmp:     write into a hidden sibling; on success it replaces `target` by renames,
        ...                                on an exception it is removed and `target` is left as it was
    swap_in(tmp, target)                   the rename step alone, for writers that stage over several calls
    Location.of(path).write_text(text)     a file, by rename (local) or one PUT (object store)

A multi-node cluster needs storage every node reads and writes (an object store URI, or a mount at the same path
on every node): `run.storage`, `data.pretrain`/`data.downstream` and `data.feature_cache_dir` accept either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger(__name__)


def _sibling(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}-{uuid.uuid4().hex[:8]}")


def swap_in(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Replace folder `target` by the finished folder `tmp` with renames (readers see old or new, never half)."""
    tmp, target = Path(tmp), Path(target)
    old = None
    if target.exists():
        old = _sibling(target, "old")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------- shared storage

def is_uri(path: str | os.PathLike) -> bool:
    """`s3://...`, `gs://...`, `file://...`: anything pyarrow resolves to a filesystem by its scheme."""
    return "://" in str(path)


# ---------------------------------------------------------------------------------------------- retries

DEFAULT_RETRY_S = 120.0  # how long an object-store operation keeps retrying an unreachable store (run.storage_retry_s)
# what an unreachable or overloaded store looks like in pyarrow's errors (AWS SDK error names, curl, HTTP 5xx);
# anything else (a missing key, access denied, a bad bucket name) fails at once
TRANSIENT_MARKERS = ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Connection refused", "Connection reset",
                     "timed out", "Timeout", "SERVICE_UNAVAILABLE", "SLOW_DOWN", "THROTTLING", "INTERNAL_FAILURE",
                     "REQUEST_TIMEOUT", "HTTP status 500", "HTTP status 502", "HTTP status 503", "HTTP status 504")


class StorageUnreachable(OSError):
    """An object-store operation kept failing with transient errors for its whole retry budget."""


def is_transient(err: BaseException) -> bool:
    if not isinstance(err, OSError) or isinstance(err, (FileNotFoundError, FileExistsError, IsADirectoryError,
                                                          NotADirectoryError, PermissionError, StorageUnreachable)):
        return False
    text = str(err)
    return any(marker in text for marker in TRANSIENT_MARKERS)


class RetryingHandler(pafs.FileSystemHandler):
    """A pyarrow filesystem (wrapped by `pafs.PyFileSystem`) that retries another one's operations while the store
    is unreachable, for up to `budget_s` seconds from the first failure, with exponential backoff; then it raises
    StorageUnreachable, one line naming the operation, the path, the budget and the last error.

    Ray Train writes checkpoints and its controller's snapshot through the filesystem it is given, and neither is
    retried by Train (a controller error fails the run at once), so a short outage of the object store would fail
    a whole stage; with this layer it only delays it. Writes are staged in a local spooled file and uploaded on
    close, so a failed upload is retried whole (an object store's PUT or multipart upload is atomic: a reader
    never sees half of it). pyarrow's own S3 retries (a few attempts within seconds) still run inside each try."""

    def __init__(self, fs: pafs.FileSystem, budget_s: float = DEFAULT_RETRY_S, on_retry=None):
        self.fs, self.budget_s, self.on_retry = fs, float(budget_s), on_retry

    def __reduce__(self):  # on_retry is a process-local hook (logging, tests); it does not travel
        return RetryingHandler, (self.fs, self.budget_s)

    def call(self, what: str, path: str, fn, *args, **kwargs):
        started, delay = time.monotonic(), 0.5
        while True:
            try:
                return fn(*args, **kwargs)
            except OSError as err:
                if not is_transient(err):
                    raise
                waited = time.monotonic() - started
                if waited >= self.budget_s:
                    raise StorageUnreachable(
                        f"storage unreachable: {what} {path} kept failing for {waited:.0f} s (retry budget "
                        f"run.storage_retry_s={self.budget_s:g}); last error: {str(err).splitlines()[0]}") from err
                if self.on_retry is not None:
                    self.on_retry(what, path, err, waited)
                elif delay == 0.5:  # the first retry of this operation
                    log.warning("storage unreachable (%s %s: %s); retrying for up to %g s", what, path,
                                str(err).splitlines()[0], self.budget_s)
                time.sleep(min(delay, max(self.budget_s - waited, 0.0)))
                delay = min(delay * 2, 8.0)

    # -------------------------------------------------------------- FileSystemHandler
    def get_type_name(self) -> str:
        return f"retrying+{self.fs.type_name}"

    def equals(self, other) -> bool:
        return isinstance(other, RetryingHandler) and self.fs.equals(other.fs) and self.budget_s == other.budget_s

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.call("stat", ",".join(paths[:3]), self.fs.get_file_info, paths)

    def get_file_info_selector(self, selector):
        return self.call("list", selector.base_dir, self.fs.get_file_info, selector)

    def create_dir(self, path, recursive):
        return self.call("mkdir", path, self.fs.create_dir, path, recursive=recursive)

    def delete_dir(self, path):
        return self.call("delete", path, self.fs.delete_dir, path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        return self.call("delete", path, self.fs.delete_dir_contents, path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        return self.call("delete", "/", self.fs.delete_dir_contents, "/", accept_root_dir=True, missing_dir_ok=True)

    def delete_file(self, path):
        return self.call("delete", path, self.fs.delete_file, path)

    def move(self, src, dest):
        return self.call("move", src, self.fs.move, src, dest)

    def copy_file(self, src, dest):
        return self.call("copy", src, self.fs.copy_file, src, dest)

    def open_input_stream(self, path):
        return self.call("read", path, self.fs.open_input_stream, path)

    def open_input_file(self, path):
        return self.call("read", path, self.fs.open_input_file, path)

    def open_output_stream(self, path, metadata):
        import pyarrow as pa

        return pa.PythonFile(_RetriedUpload(self, path, metadata), mode="w")

    def open_append_stream(self, path, metadata):
        return self.call("append", path, self.fs.open_append_stream, path, metadata=metadata)


class _RetriedUpload:
    """The file object behind RetryingHandler.open_output_stream: bytes go to a local spooled file; `close`
    uploads them, retrying the whole upload while the store is unreachable."""

    SPILL_BYTES = 64 * 2 ** 20

    def __init__(self, handler: RetryingHandler, path: str, metadata):
        self.handler, self.path, self.metadata = handler, path, metadata
        self.buffer = tempfile.SpooledTemporaryFile(max_size=self.SPILL_BYTES)
        self.closed = False

    def write(self, data) -> int:
        return self.buffer.write(data)

    def tell(self) -> int:
        return self.buffer.tell()

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.handler.call("write", self.path, self._upload)
        finally:
            self.buffer.close()

    def _upload(self) -> None:
        self.buffer.seek(0)
        with self.handler.fs.open_output_stream(self.path, metadata=self.metadata) as out:
            shutil.copyfileobj(self.buffer, out, 8 * 2 ** 20)


def with_retries(fs: pafs.FileSystem, budget_s: float = DEFAULT_RETRY_S) -> pafs.FileSystem:
    """`fs` behind RetryingHandler (another budget replaces an earlier wrapper's); local disks are returned as
    they are: they have no outages to ride through."""
    if isinstance(fs, pafs.LocalFileSystem):
        return fs
    if isinstance(fs, pafs.PyFileSystem) and isinstance(fs.handler, RetryingHandler):
        fs = fs.handler.fs
    if isinstance(fs, pafs.S3FileSystem):
        # uploads in the calling thread: copy_files runs the handler on arrow's IO threads, and S3's background
        # writes wait for those same threads (a deadlock with 8+ files: apache/arrow#32372, which Ray Train works
        # around only for a bare S3FileSystem); the upload is one PUT per file here anyway
        reconstruct, (options,) = fs.__reduce__()
        fs = reconstruct({**options, "background_writes": False})
    return pafs.PyFileSystem(RetryingHandler(fs, budget_s))


@dataclass(frozen=True)
class Location:
    """A file or folder on local disk, a shared mount or an object store, behind one pyarrow filesystem.

    Built from what a user writes (`/data/x`, `~/x`, `s3://bucket/x?endpoint_override=127.0.0.1:9000&scheme=http`,
    `gs://bucket/x`); `uri` keeps that form (query included) so another process can rebuild it, `path` is the
    path inside `fs`. Joining keeps the query: `Location.of("s3://b/runs?region=x") / "a"` is s3://b/runs/a?region=x.
    """

    uri: str
    fs: pafs.FileSystem = field(compare=False, repr=False)
    path: str

    @classmethod
    def of(cls, where: str | os.PathLike | Location) -> Location:
        if isinstance(where, Location):
            return where
        text = str(where)
        if not is_uri(text):
            local = str(Path(os.path.expanduser(text)).absolute())
            return cls(local, pafs.LocalFileSystem(), local)
        fs, path = pafs.FileSystem.from_uri(text)
        return cls(text, with_retries(fs), path.rstrip("/"))

    def with_retry(self, budget_s: float) -> Location:
        """The same location whose operations retry an unreachable store for `budget_s` seconds (object stores;
        every remote location retries for DEFAULT_RETRY_S unless given another budget)."""
        return dataclasses.replace(self, fs=with_retries(self.fs, budget_s))

    # -------------------------------------------------------------- names
    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __truediv__(self, part: str) -> Location:
        return self.join(part)

    def join(self, *parts: str) -> Location:
        tail = "/".join(str(p).strip("/") for p in parts if str(p))
        if not tail:
            return self
        if self.is_local and not is_uri(self.uri):
            path = os.path.join(self.path, tail)
            return Location(path, self.fs, path)
        base, sep, query = self.uri.partition("?")
        return Location(f"{base.rstrip('/')}/{tail}{sep}{query}", self.fs, f"{self.path.rstrip('/')}/{tail}")

    @property
    def parent(self) -> Location:
        head = self.path.rstrip("/").rsplit("/", 1)[0]
        if self.is_local and not is_uri(self.uri):
            return Location(head, self.fs, head)
        base, sep, query = self.uri.partition("?")
        return Location(f"{base.rstrip('/').rsplit('/', 1)[0]}{sep}{query}", self.fs, head)

    def __str__(self) -> str:
        return self.uri

    def relative_to(self, root: str | os.PathLike | Location) -> str:
        """This location's path below `root` (its own path when it is not below it)."""
        base = Location.of(root).path.rstrip("/") + "/"
        return self.path[len(base):] if self.path.startswith(base) else self.path

    def local_path(self) -> Path:
        """This location as a local Path (only for local storage)."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not on the local filesystem")
        return Path(self.path)

    # -------------------------------------------------------------- queries
    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A folder; on an object store, a prefix with something under it."""
        if self.info().type == pafs.FileType.Directory:
            return self.is_local or bool(self.children())
        return False

    def size(self) -> int:
        return int(self.info().size)

    def children(self) -> list[str]:
        """Names directly inside this folder (sorted); [] when it does not exist."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(i.base_name for i in infos)

    def walk_files(self) -> list[tuple[str, int]]:
        """(path relative to this folder, size) of every file below it."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        base = self.path.rstrip("/") + "/"
        return sorted((i.path[len(base):], int(i.size)) for i in infos if i.type == pafs.FileType.File)

    # -------------------------------------------------------------- reading and writing
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Local files are written beside and renamed (atomic); an object store's PUT is atomic itself."""
        if self.is_local:
            path = self.local_path()
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _sibling(path, "tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def makedirs(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def delete(self) -> None:
        """The file or the whole folder; nothing when it does not exist."""
        info = self.info()
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def upload_from(self, local: str | os.PathLike) -> None:
        """Copy a local folder's files under this location (overwriting same-named files)."""
        self.makedirs()  # a local destination needs its folder (an object store has none to make)
        pafs.copy_files(str(Path(local).absolute()), self.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def download_to(self, local: str | os.PathLike) -> Path:
        local = Path(local)
        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(self.path, str(local.absolute()), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return local


def publish_folder(local: str | os.PathLike, target: str | os.PathLike | Location, marker: str,
                   ignore: Sequence[str] = ()) -> Location:
    """Put a finished local folder at `target` so that no reader sees it half-written. Local disk: renames
    (swap_in). Object stores have no rename: the old `marker` file is deleted first, every other file is uploaded,
    the marker last, so a reader that checks for the marker (read_meta: state.json; the feature cache: cache.json)
    sees the old folder, no folder, or the whole new one. `ignore`: file-name patterns left out."""
    target = Location.of(target)
    skip = shutil.ignore_patterns(*ignore) if ignore else None
    if target.is_local:
        with staged_folder(target.local_path()) as tmp:
            shutil.copytree(local, tmp, dirs_exist_ok=True, ignore=skip)
        return target
    (target / marker).delete()
    for name, _ in target.walk_files():  # a previous version's files: none may outlive this publish
        (target / name).delete()
    staging = Path(tempfile.mkdtemp(prefix="ccr-publish-"))
    try:
        shutil.copytree(local, staging / "x", ignore=shutil.ignore_patterns(marker, *ignore))
        target.upload_from(staging / "x")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    (target / marker).write_bytes((Path(local) / marker).read_bytes())
    return target


def localize(where: str | os.PathLike | Location, cache_root: str | os.PathLike | None = None) -> str:
    """A local path to read `where` (a file or a folder) through: itself when it is local; else a copy downloaded
    once per machine into `cache_root` (default: the temp folder), keyed by the URI and the names and sizes of its
    files, so a changed remote folder is fetched again. For what libraries open by path: tokenizer folders,
    parent checkpoints, weight files."""
    loc = Location.of(where)
    if loc.is_local:
        return loc.path
    folder = loc.info().type == pafs.FileType.Directory
    listing = loc.walk_files() if folder else [(loc.name, loc.size())]
    if not listing:
        raise FileNotFoundError(f"{loc.uri}: nothing there")
    key = hashlib.sha256(json.dumps([loc.uri, listing]).encode()).hexdigest()[:16]
    dest = Path(cache_root or Path(tempfile.gettempdir()) / "ccr-ray-remote") / f"{key}-{loc.name}"
    if not dest.exists():
        tmp = _sibling(dest, "tmp")
        try:
            if folder:
                loc.download_to(tmp)
            else:
                tmp.mkdir(parents=True)
                (tmp / loc.name).write_bytes(loc.read_bytes())
            try:
                os.replace(tmp, dest)
            except OSError:  # another process on this machine fetched it first
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return str(dest if folder else dest / loc.name)


# ---------------------------------------------------------------------------------------------- Parquet


def parquet_file(where: str | os.PathLike | Location) -> pq.ParquetFile:
    loc = Location.of(where)
    return pq.ParquetFile(loc.fs.open_input_file(loc.path))


def read_table(where: str | os.PathLike | Location, columns: Sequence[str] | None = None):
    loc = Location.of(where)
    return pq.read_table(loc.path, columns=list(columns) if columns else None, filesystem=loc.fs)


def write_table(table, where: str | os.PathLike | Location, **kwargs) -> None:
    """Local: written beside and renamed (readers never see half a file); object stores: one PUT."""
    loc = Location.of(where)
    if loc.is_local:
        path = loc.local_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _sibling(path, "tmp")
        pq.write_table(table, tmp, **kwargs)
        os.replace(tmp, path)
    else:
        pq.write_table(table, loc.path, filesystem=loc.fs, **kwargs)


def ray_paths(uris: Sequence[str]) -> tuple[list[str], pafs.FileSystem | None]:
    """Paths and filesystem for `ray.data.read_parquet` (one filesystem for all; None = local paths as given)."""
    locations = [Location.of(u) for u in uris]
    if not locations or all(loc.is_local for loc in locations):
        return [loc.path for loc in locations], None
    return [loc.path for loc in locations], locations[0].fs
