"""The Ray glue every Ray-using module shares: joining or starting a cluster, and reading Parquet into blocks
that spread over tasks and actors."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from ccr_ray.net import can_bind, free_port

QUIET_ENV = "CCR_RAY_QUIET"  # "1": Ray's own INFO logs stay off the console (set by quiet_logs)
_log_file: Path | None = None  # where Ray's driver-side logs go (quiet_logs)
# what Ray's processes need to keep the console quiet: Ray Data's console at WARNING (its files keep everything),
# and no print patch in Train workers (it would turn our progress bars' state lines into INFO log records)
QUIET_WORKER_ENV = {"RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_logging.yaml")),
                    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def is_quiet() -> bool:
    return os.environ.get(QUIET_ENV) == "1"


def quiet_logs(log_file: str | os.PathLike | None, verbose: bool = False) -> None:
    """Keep the console for our own progress: Ray's driver-side logs go to `log_file` (and stay on the console
    when `verbose`), and Ray processes started later log at WARNING and above (`ensure_ray`)."""
    global _log_file
    os.environ[QUIET_ENV] = "0" if verbose else "1"
    if not verbose:
        os.environ.update(QUIET_WORKER_ENV)  # a local cluster's processes inherit the driver's environment
    _log_file = Path(log_file) if log_file is not None else None
    _route_ray_logger()


def _route_ray_logger() -> None:
    import ray  # noqa: F401  (importing ray installs the console handler this replaces)

    if _log_file is None:
        return
    _log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(_log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("ray")
    if is_quiet():
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class RayUnavailable(ConnectionError):
    """RAY_ADDRESS names a cluster nobody answers at; the message is one line saying what to do."""


PROBE_TIMEOUT_S = 5.0  # a live GCS accepts a connection at once; only a filtered address waits this long


def _answers(address: str) -> bool:
    """Whether something accepts TCP connections at a Ray address (host:port, or ray://host:port)."""
    import socket

    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return True  # not a form we can probe: let Ray judge it
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def cluster_address() -> str | None:
    """Where `ensure_ray` will run: None to attach the way Ray would on its own (RAY_ADDRESS, else the live
    cluster `ray start` left in Ray's temp dir), "local" to start a local Ray. Raises RayUnavailable, within
    seconds, when RAY_ADDRESS names a cluster that does not answer.

    The rule, for every job: attach when told (RAY_ADDRESS) or to a live local cluster (Ray's convention: the
    address `ray start` wrote to {RAY_TMPDIR or /tmp}/ray/ray_current_cluster); start a local Ray otherwise. A
    cluster that died without `ray stop` leaves its address in that file, and a plain `ray.init()` would try to
    reach it for ever ("Failed to connect to GCS at address ..."): a dead address from the file gets a warning and
    a fresh local Ray; a dead RAY_ADDRESS is an error (the user asked for that cluster)."""
    from ray._common.utils import get_ray_address_file
    from ray._private.utils import read_ray_address

    told = os.environ.get("RAY_ADDRESS", "").strip()
    if told == "local":
        return "local"
    if told and told != "auto":
        if not _answers(told):
            raise RayUnavailable(f"RAY_ADDRESS={told}: no Ray cluster answers there (start it, or unset RAY_ADDRESS "
                                 "to run on a new local Ray)")
        return None
    left = read_ray_address()
    if not left:
        return "local"
    if _answers(left):
        return None
    print(f"warning: the Ray cluster {get_ray_address_file(None)} names ({left}) is not running (stopped without "
          "`ray stop`?); starting a local Ray for this job. `ray start --head` starts a cluster jobs attach to, "
          "RAY_ADDRESS picks one.", file=sys.stderr, flush=True)
    return "local"


_UNRESOLVED = "?"


def ensure_ray(log_to_driver: bool = True, address: str | None = _UNRESOLVED) -> bool:
    """Connect to the cluster in RAY_ADDRESS (set inside `ray job submit`), a live local `ray start` cluster, or
    the one this process already joined, else start a local one (`cluster_address` has the rule; a caller that
    asked it already passes its answer as `address`). True when this call initialised Ray (the caller may then
    shut it down). Raises RayUnavailable for a dead RAY_ADDRESS."""
    import ray

    if ray.is_initialized():
        return False
    address = cluster_address() if address == _UNRESOLVED else address
    if address in (None, "local"):  # None: a live local cluster, else a new one
        _init_local(address, log_to_driver)
    else:
        ray.init(address=address, log_to_driver=log_to_driver)
    _route_ray_logger()
    return True


# Where Ray's state API is asked, in every process of a cluster that inherits it (Ray reads it before RAY_ADDRESS).
# Ray Train's detached PlacementGroupCleaner asks the state API every second whether the run's controller is alive
# and removes the run's placement group, killing its workers, when the answer is "not found". A process resolves the
# state API by auto-detection, and a cluster's recorded dashboard address is 127.0.0.1:8265 even without a dashboard,
# so with two clusters on one host the question can reach the *other* cluster's dashboard, which does not know the
# controller (reproduced with Ray 2.60, NOTES.md): a live run's workers die with "placement group was removed".
STATE_API_ENV = "RAY_API_SERVER_ADDRESS"
DEFAULT_DASHBOARD_PORT = 8265
LOCAL_START_ATTEMPTS = 3
_STARTUP_TIMEOUT = "timed out during startup"  # Ray's Node: the raylet did not register with the GCS in 30 s


class StartAgain(Exception):
    """A start that came up wrong in a way another try can fix (`start_with_retries` tries again)."""


def _init_local(address: str | None, log_to_driver: bool) -> None:
    """ray.init for a Ray on this machine (`start_with_retries` has why it may take more than one try)."""
    import ray

    own_cluster = address == "local" and not os.environ.get(STATE_API_ENV)

    def start() -> None:
        own_dashboard, raylet_env = {}, {}
        if address == "local":  # a new cluster, this job's own
            raylet_env = own_worker_priority()
        if own_cluster:
            # its processes ask its own dashboard, on a port nobody else holds (chosen again on each try)
            port = DEFAULT_DASHBOARD_PORT if can_bind(DEFAULT_DASHBOARD_PORT) else free_port()
            own_dashboard = {"dashboard_host": "127.0.0.1", "dashboard_port": port}
            raylet_env[STATE_API_ENV] = f"http://127.0.0.1:{port}"
        with environment(raylet_env), _held_dashboard_errors() as held:  # the raylet, and every process it
            ray.init(address=address, log_to_driver=log_to_driver, **own_dashboard)  # starts, inherit it
        node = getattr(ray._private.worker, "_global_node", None)
        if own_cluster and node is not None and node.webui_url is None:
            # another Ray started between can_bind and the dashboard's bind (two jobs starting at once): the port
            # the cluster's processes were told is someone else's, and a Train run's placement-group cleaner would
            # ask that one. Held back: Ray's traceback of the failed bind, for a one-line warning instead.
            raise StartAgain(f"its dashboard's port {own_dashboard['dashboard_port']} was taken while it started")
        held.release()

    start_with_retries(start)


@contextlib.contextmanager
def _held_dashboard_errors():
    """What Ray's `services` logger says during a start (where a dashboard that failed to bind logs its
    traceback), held back; the caller releases it when the start is kept."""

    class Held(logging.Filter):
        def __init__(self):
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def filter(self, record: logging.LogRecord) -> bool:
            self.records.append(record)
            return False

        def release(self) -> None:
            for record in self.records:
                services.handle(record)
            self.records = []

    services = logging.getLogger("ray._private.services")
    held = Held()
    services.addFilter(held)
    try:
        yield held
    finally:
        services.removeFilter(held)


# Ray starts its worker processes at nice 15 (`worker_niceness`, src/ray/common/ray_config_def.h: "so that the OS
# prioritizes CPU for other processes over worker"), so any busy process at the normal priority takes the CPU from
# them: beside two `yes` a Serve replica got ~2 % of a core, requests timed out and the suite ran ~15x slower, where
# the host was only half as fast for everything else. A local Ray a job starts for itself does the job's work: its
# workers run at the priority of the command that started it (`nice python jobs/...` still lowers them all).
WORKER_NICENESS_ENV = "RAY_worker_niceness"


def own_worker_priority() -> dict[str, str]:
    """The raylet environment that starts workers at the starting process's own priority (unless the user set
    Ray's value)."""
    return {} if os.environ.get(WORKER_NICENESS_ENV) else {WORKER_NICENESS_ENV: "0"}


T = TypeVar("T")


def start_with_retries(start: Callable[[], T], attempts: int = LOCAL_START_ATTEMPTS) -> T:
    """Run `start` (something that starts Ray processes on this machine: ray.init, a test's Cluster), again when
    Ray's start-up gives up. Ray waits a fixed 30 s for a new node's raylet to register with the GCS
    (ray/_private/node.py; its message's RAY_raylet_start_wait_time_s is read nowhere); on a 2-core host with other
    CPU-bound processes (two `yes` beside a test run) a fresh node has been seen to need longer, and
    `export/serve.py` and the suite's Ray fixtures failed with "The current node timed out during startup". Each
    retry first stops what the failed attempt started; any other error is raised at once (a `StartAgain` from
    `start` is tried again too)."""
    import ray
    from ray.thirdparty_files import psutil  # Ray's own copy (a Ray install has no other)

    for attempt in range(1, attempts + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            return start()
        except Exception as err:
            if not (isinstance(err, StartAgain) or _STARTUP_TIMEOUT in str(err)) or attempt == attempts:
                raise
            why = err if isinstance(err, StartAgain) else "its start-up timed out (a busy machine?)"
            print(f"warning: Ray: {why}; starting it again ({attempt + 1}/{attempts})", file=sys.stderr,
                  flush=True)
        _stop_new_children(before)
        ray.shutdown()
    raise AssertionError("unreachable")


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """os.environ with `values` set inside the block, as it was after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _stop_new_children(before: set[int]) -> None:
    from ray.thirdparty_files import psutil

    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for process in started:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(started, timeout=30)


def owns_local_ray() -> bool:
    """Whether this process started the Ray it is connected to (its shutdown stops the whole cluster), rather
    than attaching to one."""
    from ray._private import worker

    node = getattr(worker, "_global_node", None)
    return node is not None and node.is_head()


def quiet_worker_console() -> None:
    """In a Train worker of a quiet run: drop Ray's own INFO records from the console handlers (its log files keep
    them). Ray Train logs a line per report through a logger named by its file path, which its level filter misses."""
    import ray

    ray_dir = os.path.dirname(ray.__file__)

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.pathname.startswith(ray_dir)

    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(keep)


def train_logging_config(verbose: bool):
    """Ray Train's console level for a run: warnings only unless verbose (its log files keep everything)."""
    import ray

    return ray.LoggingConfig(log_level="INFO" if verbose else "WARNING")


def read_parquet_blocks(files: Sequence[str], **kwargs):
    """`ray.data.read_parquet` (local paths or URIs on one filesystem) with the V1 datasource: it splits files into
    row-group blocks, so tasks and actor
    pools get work before a whole file is read. V2's size-balanced bin packing (128 MiB bins) read the 20k-image
    demo in a single task and serialised the whole stream behind it (first batch after 19 s instead of 3.6 s)."""
    import ray.data

    from ccr_ray.storage import ray_paths

    paths, filesystem = ray_paths(files)  # files on shared storage: their filesystem, with its URI options
    context = ray.data.DataContext.get_current()
    previous, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(paths, filesystem=filesystem, **kwargs)
    finally:
        context.use_datasource_v2 = previous
