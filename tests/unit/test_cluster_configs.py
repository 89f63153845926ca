"""Offline validation of cluster/: every launcher YAML, KubeRay manifest, the Dockerfile, the runtime env, the GPU
constraints and every job command they (and the runbook) contain. No network, no cloud, no Ray cluster.

- Launcher YAMLs go through Ray's own `prepare_config` + `validate_config` (ray-schema.json plus its checks).
  The provider bootstrap that would call the cloud is never called.
- KubeRay cluster specs (the RayCluster, each RayJob's rayClusterSpec) go through Ray's KubeRay support, which
  derives the autoscaler config and validates it.
- Pins: the Ray version, the Python version and every image tag match the installed ray and the Python the
  project is pinned for (the header of constraints.txt).
- Security defaults: token auth in every config, dashboard on loopback (launcher) or behind ClusterIP (KubeRay).
- Every entrypoint is a real job whose argument parser accepts it and whose --set values resolve.

Each check is a function that raises on a bad config; the last tests feed it broken copies, so it can fail.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import prepare_config, validate_config

from ccr_ray.stages import resolve_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
LAUNCHER_FILES = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
KUBERAY_FILES = [CLUSTER / "kuberay" / name for name in ("raycluster.yaml", "rayjob-train.yaml", "rayjob-tune.yaml",
                                                           "rayservice.yaml")]
SERVE_CONFIG = CLUSTER / "serve" / "serve_config.yaml"
RUNBOOK = CLUSTER / "README.md"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"

AUTH_SECRET, AUTH_KEY = "ccr-ray-auth", "auth_token"
# Jobs a cluster runs unattended: each must offer --dry-run so a command can be checked before GPUs are paid for.
DRY_RUN_JOBS = {"train_stage", "cache_features", "tune"}
JOB_PATH = re.compile(r"(?:^|/)jobs/(\w+)\.py$")
SHELL_OPERATORS = {"&&", "||", "|", ";", "&", ">", ">>", "<", "(", ")"}


# ------------------------------------------------------------------------------------------------- pins


def target_python() -> tuple[int, int]:
    """The Python the project is pinned for: constraints.txt's header, which must lie in requires-python."""
    match = re.search(r"Python (\d+)\.(\d+)", (REPO / "constraints.txt").read_text())
    assert match, "constraints.txt: no 'Python X.Y' in its header"
    version = (int(match[1]), int(match[2]))
    requires = re.search(r'requires-python\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert requires and f"{version[0]}.{version[1]}" in SpecifierSet(requires[1]), (version, requires)
    return version


def expected_tag() -> str:
    major, minor = target_python()
    return f"{ray.__version__}-py{major}{minor}-gpu"


def split_image(image: str) -> tuple[str, str]:
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    return name, tag


def check_image(image: str, repository: str | None = None) -> None:
    name, tag = split_image(image)
    assert "ray-ml" not in name, f"{image}: the ray-ml images are no longer published"
    assert tag == expected_tag(), f"{image}: tag must be {expected_tag()} (installed ray, pinned Python, gpu)"
    if repository is not None:
        assert name == repository, f"{image}: expected {repository}"


def read_pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name.lower())] = version
    return pins


def cuda_tag() -> str:
    """The +cuXXX build constraints-gpu.txt pins (torch and torchvision must agree)."""
    pins = read_pins((REPO / "constraints-gpu.txt").read_text())
    tags = {pins[p].partition("+")[2] for p in ("torch", "torchvision")}
    assert len(tags) == 1, f"torch and torchvision pin different builds: {tags}"
    return tags.pop()


def check_gpu_constraints(cpu_text: str, gpu_text: str) -> None:
    cpu, gpu = read_pins(cpu_text), read_pins(gpu_text)
    assert set(cpu) == set(gpu), f"packages differ: {sorted(set(cpu) ^ set(gpu))}"
    for name in ("torch", "torchvision"):
        assert re.fullmatch(r"cu12\d+", gpu[name].partition("+")[2]), f"{name}: not a CUDA 12.x build: {gpu[name]}"
        assert cpu[name].partition("+")[0] == gpu[name].partition("+")[0], f"{name}: {cpu[name]} vs {gpu[name]}"
    assert cpu["torch"].endswith("+cpu"), cpu["torch"]
    drift = {n: (cpu[n], gpu[n]) for n in cpu if n not in ("torch", "torchvision") and cpu[n] != gpu[n]}
    assert not drift, f"constraints-gpu.txt drifted from constraints.txt: {drift}"


def index_tag(text: str) -> str:
    """The cuXXX of every PyTorch wheel index named in text (they must agree)."""
    tags = set(re.findall(r"download\.pytorch\.org/whl/(cu\d+)", text))
    assert len(tags) == 1, f"expected one PyTorch CUDA index, found {tags or 'none'}"
    return tags.pop()


# --------------------------------------------------------------------------------------- launcher configs


def load(path: Path):
    return yaml.safe_load(path.read_text())


def validate_launcher(config: dict) -> dict:
    """What `ray up` does before it calls the cloud: fill defaults, then Ray's schema and checks."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def ray_start_commands(commands: list[str]) -> list[str]:
    starts = [c for c in commands if "ray start" in c]
    assert starts, f"no `ray start` among {commands}"
    return starts


def check_launcher_security(prepared: dict) -> None:
    options = " ".join(prepared["docker"].get("run_options", []))
    assert "--env RAY_AUTH_MODE=token" in options, "docker run_options must set RAY_AUTH_MODE=token"
    token_path = re.search(r"--env RAY_AUTH_TOKEN_PATH=(\S+)", options)
    assert token_path, "docker run_options must point RAY_AUTH_TOKEN_PATH at the mounted token"
    mounted = {remote.replace("~/", "/home/ray/", 1).rstrip("/") for remote in prepared["file_mounts"]}
    assert str(Path(token_path[1]).parent) in mounted, f"{token_path[1]} is not in a file mount"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in ray_start_commands(prepared[key]):
            assert "RAY_AUTH_MODE=token" in command, f"{key}: ray start without token auth: {command}"
            assert f"RAY_AUTH_TOKEN_PATH={token_path[1]}" in command, f"{key}: another token path: {command}"
            assert "0.0.0.0" not in command, f"{key}: binds every interface: {command}"
    for command in ray_start_commands(prepared["head_start_ray_commands"]):
        assert "--dashboard-host=127.0.0.1" in command, f"dashboard not on loopback: {command}"


def check_launcher_pins(prepared: dict) -> None:
    docker = prepared["docker"]
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            check_image(docker[key], "rayproject/ray")
    installs = [c for c in prepared["setup_commands"] if "pip install" in c]
    assert installs, "setup_commands must install the project"
    for command in installs:
        assert "-c ~/ccr-ray/constraints-gpu.txt" in command, f"install without the GPU pins: {command}"
        assert index_tag(command) == cuda_tag(), f"PyTorch index does not match constraints-gpu.txt: {command}"
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert not head["resources"].get("GPU"), "the head is the CPU node"
    workers = [t for name, t in types.items() if name != prepared["head_node_type"]]
    assert workers and all(t["resources"].get("GPU") == 1 for t in workers), "one GPU per worker"
    for node_type in workers:
        assert 0 <= node_type["min_workers"] < node_type["max_workers"] <= prepared["max_workers"], node_type


@pytest.fixture(params=LAUNCHER_FILES, ids=lambda p: p.name)
def launcher(request) -> dict:
    return load(request.param)


def test_launcher_passes_rays_validation(launcher):
    validate_launcher(launcher)


def test_launcher_keeps_security_defaults(launcher):
    check_launcher_security(validate_launcher(launcher))


def test_launcher_matches_pins(launcher):
    check_launcher_pins(validate_launcher(launcher))


def test_launcher_sets_every_command_list_itself(launcher):
    # prepare_config fills a missing key from Ray's defaults, which install a nightly wheel and open the dashboard.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands",
                "head_start_ray_commands", "worker_start_ray_commands", "file_mounts"):
        assert key in launcher, f"{key} missing: Ray's default would be used"


# ----------------------------------------------------------------------------------------- KubeRay manifests


def kuberay_docs() -> list[dict]:
    return [doc for path in KUBERAY_FILES for doc in yaml.safe_load_all(path.read_text()) if doc]


def cluster_specs(doc: dict) -> list[tuple[str, dict]]:
    """(name, RayCluster spec) of a RayCluster or of the cluster a RayJob creates."""
    if doc["kind"] == "RayCluster":
        return [(doc["metadata"]["name"], doc["spec"])]
    if doc["kind"] == "RayJob":
        return [(doc["metadata"]["name"], doc["spec"]["rayClusterSpec"])]
    if doc["kind"] == "RayService":
        return [(doc["metadata"]["name"], doc["spec"]["rayClusterConfig"])]
    return []


def groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def derive(name: str, spec: dict) -> dict:
    """Ray's own KubeRay path: the autoscaler config the operator's autoscaler would build, validated."""
    derived = _derive_autoscaling_config_from_ray_cr(
        {"metadata": {"name": name, "namespace": "default"}, "spec": copy.deepcopy(spec)})
    validate_config(prepare_config(derived))
    return derived


def env_of(env: list[dict]) -> dict[str, dict]:
    return {item["name"]: item for item in env}


def check_token_env(env: list[dict], where: str) -> None:
    items = env_of(env)
    assert items.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE=token missing"
    ref = items.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    assert ref == {"name": AUTH_SECRET, "key": AUTH_KEY}, f"{where}: RAY_AUTH_TOKEN must come from the Secret"
    assert "value" not in items["RAY_AUTH_TOKEN"], f"{where}: a literal token"


def walk(node, path=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")
    yield path, node


def check_kuberay_security(doc: dict) -> None:
    for path, value in walk(doc):
        assert value not in ("NodePort", "LoadBalancer"), f"{path}: {value} exposes the cluster"
    assert doc["kind"] in ("RayCluster", "RayJob", "RayService"), \
        f"{doc['kind']}: unexpected kind (an Ingress or Service?)"
    for name, spec in cluster_specs(doc):
        assert spec.get("authOptions") == {"mode": "token", "secretName": AUTH_SECRET}, f"{name}: authOptions"
        assert spec["headGroupSpec"].get("serviceType") == "ClusterIP", f"{name}: head Service must be ClusterIP"
        assert "dashboard-host" in spec["headGroupSpec"].get("rayStartParams", {}), \
            f"{name}: set dashboard-host explicitly, with the reason beside it"
        if spec.get("enableInTreeAutoscaling"):
            check_token_env(spec.get("autoscalerOptions", {}).get("env", []), f"{name} autoscaler")
        for group, group_spec in groups(spec):
            check_token_env(group_spec["template"]["spec"]["containers"][0].get("env", []), f"{name}/{group}")


def check_kuberay_pins(doc: dict) -> None:
    for name, spec in cluster_specs(doc):
        assert spec["rayVersion"] == ray.__version__, f"{name}: rayVersion {spec['rayVersion']}"
        images = [c["image"] for _, g in groups(spec) for key in ("initContainers", "containers")
                  for c in g["template"]["spec"].get(key, [])]
        repositories = {split_image(image)[0] for image in images}
        assert len(repositories) == 1, f"{name}: one project image everywhere, got {repositories}"
        for image in images:
            check_image(image)


def check_gpu_groups(name: str, spec: dict, derived: dict) -> None:
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits, f"{name}: the head is the CPU node"
    for group, group_spec in groups(spec)[1:]:
        resources = group_spec["template"]["spec"]["containers"][0]["resources"]
        for kind in ("requests", "limits"):
            assert str(resources[kind].get("nvidia.com/gpu")) == "1", f"{name}/{group}: one GPU per pod ({kind})"
        assert derived["available_node_types"][group]["resources"].get("GPU") == 1, f"{name}/{group}"
        assert group_spec["minReplicas"] <= group_spec["maxReplicas"], f"{name}/{group}"


KUBERAY_DOCS = kuberay_docs()


@pytest.fixture(params=KUBERAY_DOCS, ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def manifest(request) -> dict:
    return copy.deepcopy(request.param)


def check_cpu_groups(name: str, spec: dict, derived: dict) -> None:
    """Serving: onnxruntime on CPUs, no GPU asked for anywhere; workers autoscale within their bounds."""
    for group, group_spec in groups(spec):
        resources = group_spec["template"]["spec"]["containers"][0]["resources"]
        for kind in ("requests", "limits"):
            assert "nvidia.com/gpu" not in resources[kind], f"{name}/{group}: the service runs on CPUs ({kind})"
    for group, group_spec in groups(spec)[1:]:
        assert not derived["available_node_types"][group]["resources"].get("GPU"), f"{name}/{group}"
        assert 1 <= group_spec["minReplicas"] <= group_spec["maxReplicas"], f"{name}/{group}"


def test_kuberay_files_hold_the_expected_kinds():
    kinds = sorted(doc["kind"] for doc in KUBERAY_DOCS)
    assert kinds == ["RayCluster", "RayJob", "RayJob", "RayService"], kinds
    assert all(doc["apiVersion"] == "ray.io/v1" for doc in KUBERAY_DOCS)


def test_kuberay_derives_a_valid_autoscaler_config(manifest):
    for name, spec in cluster_specs(manifest):
        check = check_cpu_groups if manifest["kind"] == "RayService" else check_gpu_groups
        check(name, spec, derive(name, spec))


def test_kuberay_keeps_security_defaults(manifest):
    check_kuberay_security(manifest)


def test_kuberay_matches_pins(manifest):
    check_kuberay_pins(manifest)


def check_rayjob(doc: dict) -> None:
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True, "a RayJob's cluster must go when the job ends"
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == load(RUNTIME_ENV), \
        f"{doc['metadata']['name']}: runtimeEnvYAML differs from cluster/runtime_env.yaml"
    workdir = re.search(r"^WORKDIR (\S+)", DOCKERFILE.read_text(), re.M)[1]
    for argv in job_invocations(spec["entrypoint"]):
        assert argv[1].startswith(f"{workdir}/jobs/"), f"{argv[1]}: the image's jobs are in {workdir}/jobs"


def test_rayjobs_carry_the_runtime_env_and_the_image_paths():
    for doc in KUBERAY_DOCS:
        if doc["kind"] == "RayJob":
            check_rayjob(doc)


# ------------------------------------------------------------------------------- the retrieval service


def check_serve_config(config: dict, where: str, loopback: bool) -> None:
    """Ray's own schema, then what the app will do with it: the import path is ccr_ray's builder, its args
    validate, every deployment exists and its user_config is one the replicas accept."""
    from ray.serve.schema import ServeDeploySchema

    from ccr_ray.serve import app as serve_app
    from ccr_ray.serve.service import Limits

    schema = ServeDeploySchema.model_validate(config)
    host = schema.http_options.host
    if loopback:
        assert host == "127.0.0.1", f"{where}: http_options.host {host}: the service binds loopback"
    for application in schema.applications:
        module, _, attr = application.import_path.partition(":")
        assert importlib.import_module(module) is serve_app and attr == "build_app", \
            f"{where}: import_path {application.import_path}"
        serve_app.AppArgs.model_validate(application.args)
        serve_app.build_app(application.args)  # binds without Ray: the args make an application
        for deployment in application.deployments:
            assert deployment.name == serve_app.DEPLOYMENT, f"{where}: no deployment {deployment.name!r}"
            user = dict(deployment.user_config or {})
            unknown = set(user) - {*serve_app.DEFAULT_BATCH, "limits"}
            assert not unknown, f"{where}: user_config keys {unknown}"
            Limits.from_dict(user.get("limits"))
            assert int(user.get("max_batch_size", 1)) <= deployment.max_ongoing_requests, \
                f"{where}: a batch larger than max_ongoing_requests never fills"


def rayservice() -> dict:
    return copy.deepcopy(next(doc for doc in KUBERAY_DOCS if doc["kind"] == "RayService"))


def check_serve_env(config: dict, where: str, doc: dict | None = None) -> None:
    """Serve's start-up settings (ccr_ray/serve/ray_env.py) in every application's runtime_env and, for KubeRay,
    with the ingress settings in the environment of every Ray container (where Serve's controller, proxies and
    replicas read them)."""
    from ccr_ray.serve.ray_env import INGRESS_ENV, SERVE_ENV

    for application in config["applications"]:
        env_vars = (application.get("runtime_env") or {}).get("env_vars") or {}
        for key, value in SERVE_ENV.items():
            assert env_vars.get(key) == value, f"{where}: {application['name']} runtime_env lacks {key}={value}"
    if doc is None:
        return
    cluster = doc["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    for name, group in groups:
        container = group["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env") or []}
        for key, value in {**SERVE_ENV, **INGRESS_ENV}.items():
            assert env.get(key) == value, f"{where}: {name} container env lacks {key}={value}"


def test_serve_configs_carry_the_serve_start_up_settings():
    from ccr_ray.serve.ray_env import INGRESS_ENV

    check_serve_env(load(SERVE_CONFIG), str(SERVE_CONFIG))
    # the launcher cluster's ingress settings belong in `ray start`'s environment: the file says which
    text = SERVE_CONFIG.read_text()
    assert all(f"{key}={value}" in text for key, value in INGRESS_ENV.items()), INGRESS_ENV
    for config in (load(SERVE_CONFIG), yaml.safe_load(rayservice()["spec"]["serveConfigV2"])):
        for application in config["applications"]:  # no per-request access log line (CPU on every request)
            assert all(d["logging_config"] == {"enable_access_log": False} for d in application["deployments"])
    doc = rayservice()
    check_serve_env(yaml.safe_load(doc["spec"]["serveConfigV2"]), "rayservice serveConfigV2", doc)


@pytest.mark.parametrize("where", ["serve_config", "rayservice app", "rayservice worker"])
def test_rejects_a_serve_config_without_the_start_up_settings(where):
    config, doc = load(SERVE_CONFIG), rayservice()
    if where == "serve_config":
        del config["applications"][0]["runtime_env"]["env_vars"]["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"]
        with pytest.raises(AssertionError, match="RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"):
            check_serve_env(config, "broken")
        return
    served = yaml.safe_load(doc["spec"]["serveConfigV2"])
    if where == "rayservice app":
        served["applications"][0]["runtime_env"]["env_vars"]["RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"] = "10"
    else:
        container = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        container["env"] = [e for e in container["env"] if not e["name"].startswith("RAY_SERVE_")]
    with pytest.raises(AssertionError, match="RAY_SERVE_PROXY"):
        check_serve_env(served, "broken", doc)


def test_serve_config_is_valid_and_binds_loopback():
    check_serve_config(load(SERVE_CONFIG), str(SERVE_CONFIG), loopback=True)


def test_rayservice_serves_the_serve_configs_application():
    doc = rayservice()
    served = yaml.safe_load(doc["spec"]["serveConfigV2"])
    check_serve_config(served, "rayservice serveConfigV2", loopback=False)
    assert served["applications"] == load(SERVE_CONFIG)["applications"], \
        "rayservice.yaml's application differs from cluster/serve/serve_config.yaml"
    check_kuberay_security(doc)
    check_kuberay_pins(doc)


@pytest.mark.parametrize("breakage", ["import-path", "arg", "limit", "deployment", "host", "serve-loadbalancer"])
def test_rejects_broken_serve_configs(breakage):
    config, doc = load(SERVE_CONFIG), rayservice()
    application = config["applications"][0]
    if breakage == "import-path":
        application["import_path"] = "ccr_ray.serve.app:build_ap"
    elif breakage == "arg":
        application["args"]["modell"] = "/serving/model"
    elif breakage == "limit":
        application["deployments"][0]["user_config"]["limits"]["max_kk"] = 5
    elif breakage == "deployment":
        application["deployments"][0]["name"] = "Retreival"
    elif breakage == "host":
        config["http_options"]["host"] = "0.0.0.0"
    else:
        doc["spec"]["serveService"] = {"spec": {"type": "LoadBalancer"}}
        with pytest.raises(AssertionError, match="LoadBalancer"):
            check_kuberay_security(doc)
        return
    with pytest.raises((AssertionError, ValueError)):
        check_serve_config(config, "broken", loopback=True)


# ------------------------------------------------------------------------- Dockerfile, runtime env, pins


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), re.M))


def test_dockerfile_matches_pins():
    text, args = DOCKERFILE.read_text(), dockerfile_args()
    major, minor = target_python()
    assert args["RAY_VERSION"] == ray.__version__, args
    assert args["PYTHON_TAG"] == f"py{major}{minor}", args
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-gpu$", text, re.M)
    assert index_tag(args["TORCH_INDEX_URL"]) == cuda_tag()
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and all("-c constraints-gpu.txt" in line for line in installs), installs
    workdir = re.search(r"^WORKDIR (\S+)$", text, re.M)[1]
    assert workdir.startswith("/home/ray/") and re.search(r"^COPY .* jobs \./jobs$", text, re.M), \
        "the RayJob entrypoints run the image's {WORKDIR}/jobs"


def dockerfile_env() -> dict[str, str]:
    block = re.search(r"^ENV (.*?)(?:\n\n|\Z)", DOCKERFILE.read_text(), re.M | re.S)[1]
    return dict(item.split("=", 1) for item in shlex.split(block.replace("\\\n", " ")))


def test_runtime_env_carries_what_the_jobs_rely_on(monkeypatch):
    from ccr_ray import cli

    env_vars = load(RUNTIME_ENV)["env_vars"]
    assert all(isinstance(v, str) for v in env_vars.values()), "runtime_env env_vars must be strings"
    set_by_jobs: dict[str, str] = {}
    monkeypatch.setattr(cli.os, "environ", set_by_jobs)
    cli.quiet_ray_env()  # what every job sets in its own process; workers get it only from runtime_env
    assert set_by_jobs and {k: env_vars.get(k) for k in set_by_jobs} == set_by_jobs
    assert env_vars["RAY_AUTH_MODE"] == "token"
    image_env = dockerfile_env()
    assert image_env["RAY_AUTH_MODE"] == "token"
    for key, value in image_env.items():  # the image's defaults never contradict the jobs' runtime env
        assert env_vars.get(key, value) == value, (key, value, env_vars[key])


def test_gpu_constraints_have_the_cpu_pins():
    check_gpu_constraints((REPO / "constraints.txt").read_text(), (REPO / "constraints-gpu.txt").read_text())
    assert read_pins((REPO / "constraints.txt").read_text())["ray"] == ray.__version__


# ---------------------------------------------------------------------------------------------- entrypoints


def job_invocations(command: str) -> list[list[str]]:
    """Each `python .../jobs/NAME.py ARGS` in a shell command line, cut at shell operators."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)
    found = []
    for i, token in enumerate(tokens[:-1]):
        if token in ("python", "python3") and JOB_PATH.search(tokens[i + 1]):
            end = next((j for j in range(i + 2, len(tokens)) if tokens[j] in SHELL_OPERATORS), len(tokens))
            found.append(tokens[i:end])
    return found


def parse_job(name: str, argv: list[str]):
    try:
        module = importlib.import_module(name)  # tests/conftest.py puts jobs/ on sys.path
    except ModuleNotFoundError as err:
        if err.name == name:
            pytest.fail(f"jobs/{name}.py does not exist")
        raise
    if hasattr(module, "parse_args"):
        parse = module.parse_args
    elif hasattr(module, "build_parser"):
        parse = module.build_parser().parse_args
    else:
        pytest.fail(f"jobs/{name}.py has no parse_args(argv) or build_parser(): its arguments cannot be checked")
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse(argv)
    except SystemExit:
        raise AssertionError(f"jobs/{name}.py rejects {argv}: {stderr.getvalue().strip()}") from None


def check_entrypoint(argv: list[str]) -> None:
    """The job exists, its parser accepts the arguments, and its config (stage, --config, --set) resolves."""
    name = JOB_PATH.search(argv[1])[1]
    args = parse_job(name, argv[2:])
    if name in DRY_RUN_JOBS:
        assert parse_job(name, [*argv[2:], "--dry-run"]).dry_run is True, f"{name}: no --dry-run"
    if getattr(args, "stage", None) is None:  # prepare_data, evaluate, tune --report: no config to resolve
        return
    overrides = list(getattr(args, "overrides", []) or [])
    if getattr(args, "num_workers", None) is not None:
        overrides.append(f"scaling.num_workers={args.num_workers}")
    if getattr(args, "use_gpu", False):
        overrides.append("scaling.use_gpu=true")
    resolved = resolve_config(args.stage, args.config, overrides).to_dict()
    for item in getattr(args, "space", None) or []:  # tune: every swept key is a config field
        node = resolved
        for part in item.split("=", 1)[0].split("."):
            assert isinstance(node, dict) and part in node, f"--space {item}: no such config field"
            node = node[part]


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: variables.get(m[1], m[0]), text)


def runbook_commands() -> list[str]:
    """Logical command lines (continuations joined) of the runbook's code blocks, with its own variables
    (`export NAME=value`) expanded."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", RUNBOOK.read_text(), re.M | re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    variables: dict[str, str] = {}
    commands = []
    for line in lines:
        line = expand(line, variables)
        try:
            words = shlex.split(line, comments=True) if "$(" not in line else []
        except ValueError:  # not every line of a code block is a shell command (the bucket layout)
            words = []
        for word in words[1:] if words[:1] == ["export"] else words[:1]:
            if re.fullmatch(r"[A-Za-z_]\w*=\S*", word):
                key, value = word.split("=", 1)
                variables[key] = value
        commands.append(line)
    return commands


def nlt_variant(rayjob_text: str) -> str:
    """The runbook makes the nlt RayJob from the le one with sed; the same substitution here."""
    return rayjob_text.replace("--stage le", "--stage nlt")


def all_entrypoints() -> list[tuple[str, list[str]]]:
    found = []
    for path in LAUNCHER_FILES:
        for job, command in load(path).get("metadata", {}).get("ccr_ray_jobs", {}).items():
            found += [(f"{path.name}:{job}", argv) for argv in job_invocations(command)]
    for doc in KUBERAY_DOCS:
        if doc["kind"] == "RayJob":
            found += [(f"{doc['metadata']['name']}", argv) for argv in job_invocations(doc["spec"]["entrypoint"])]
    train = yaml.safe_load(nlt_variant((CLUSTER / "kuberay" / "rayjob-train.yaml").read_text()))
    found += [("ccr-ray-nlt (sed)", argv) for argv in job_invocations(train["spec"]["entrypoint"])]
    for i, command in enumerate(runbook_commands()):
        if "jobs/" in command:
            found += [(f"README:{i}:{argv[1]}", argv) for argv in job_invocations(command)]
    return found


ENTRYPOINTS = all_entrypoints()


def test_every_yaml_and_the_runbook_name_jobs():
    sources = {where.split(":")[0] for where, _ in ENTRYPOINTS}
    assert {"aws.yaml", "gcp.yaml", "ccr-ray-le", "ccr-ray-le-sweep", "README"} <= sources, sources
    jobs = {JOB_PATH.search(argv[1])[1] for _, argv in ENTRYPOINTS}
    assert {"train_stage", "tune", "prepare_data", "evaluate"} <= jobs, jobs


@pytest.mark.parametrize("argv", [argv for _, argv in ENTRYPOINTS], ids=[where for where, _ in ENTRYPOINTS])
def test_entrypoint_is_a_real_job(argv):
    check_entrypoint(argv)


# ------------------------------------------------------------------------------------------------- runbook


def test_runbook_shows_token_auth_tunnels_and_the_secret():
    text = RUNBOOK.read_text()
    commands = runbook_commands()
    submits = [i for i, c in enumerate(commands) if c.startswith("ray job submit")]
    assert submits, "the runbook submits no job"
    exports = [i for i, c in enumerate(commands) if re.match(r"export .*RAY_AUTH_MODE=token", c)]
    assert exports and exports[0] < submits[0], "export RAY_AUTH_MODE=token before the first ray job submit"
    for i in submits:
        assert "--runtime-env cluster/runtime_env.yaml" in commands[i], commands[i]
    assert any(c.startswith("ray dashboard cluster/") for c in commands), "SSH tunnel to the launcher's dashboard"
    assert any(c.startswith("kubectl port-forward") for c in commands), "kubectl port-forward to KubeRay's"
    assert any(f"kubectl create secret generic {AUTH_SECRET} --from-file={AUTH_KEY}=" in c for c in commands)
    assert "## Rehearsal on one machine" in text


def test_runbook_sed_targets_are_unambiguous():
    text = (CLUSTER / "kuberay" / "rayjob-train.yaml").read_text()
    assert text.count("--stage le") == 1 and len(re.findall(r"name: ccr-ray-le$", text, re.M)) == 1


# --------------------------------------------------------------------------- broken copies must be rejected


def test_rejects_unknown_top_level_key():
    broken = load(CLUSTER / "aws.yaml")
    broken["gpu_count"] = 4
    with pytest.raises(jsonschema.ValidationError, match="gpu_count"):
        validate_launcher(broken)


def test_rejects_fractional_node_resources():
    broken = load(CLUSTER / "gcp.yaml")
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_launcher(broken)


@pytest.mark.parametrize("image", ["rayproject/ray:2.0.0-py311-gpu", "rayproject/ray-ml:2.49.0-py311-gpu",
                                   "rayproject/ray:{ray}-py39-gpu", "rayproject/ray:{ray}-py311-cpu"])
def test_rejects_wrong_image(image):
    broken = validate_launcher(load(CLUSTER / "aws.yaml"))
    broken["docker"]["image"] = image.format(ray=ray.__version__)
    with pytest.raises(AssertionError):
        check_launcher_pins(broken)


def test_rejects_rays_default_start_commands():
    # Without our own head_start_ray_commands, prepare_config brings Ray's: dashboard on 0.0.0.0, no token.
    broken = load(CLUSTER / "aws.yaml")
    del broken["head_start_ray_commands"]
    with pytest.raises(AssertionError):
        check_launcher_security(validate_launcher(broken))


def test_rejects_worker_group_without_min_replicas():
    name, spec = cluster_specs(copy.deepcopy(KUBERAY_DOCS[0]))[0]
    del spec["workerGroupSpecs"][0]["minReplicas"]
    with pytest.raises(KeyError):
        derive(name, spec)


@pytest.mark.parametrize("breakage", ["loadbalancer", "literal-token", "no-authoptions", "ray-version"])
def test_rejects_insecure_or_unpinned_manifest(breakage):
    doc = copy.deepcopy(next(d for d in KUBERAY_DOCS if d["kind"] == "RayJob"))
    spec = doc["spec"]["rayClusterSpec"]
    if breakage == "loadbalancer":
        spec["headGroupSpec"]["serviceType"] = "LoadBalancer"
    elif breakage == "literal-token":
        token = env_of(spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"])["RAY_AUTH_TOKEN"]
        token.pop("valueFrom")
        token["value"] = "hunter2"
    elif breakage == "no-authoptions":
        del spec["authOptions"]
    else:
        spec["rayVersion"] = "2.0.0"
    with pytest.raises(AssertionError):
        check_kuberay_security(doc)
        check_kuberay_pins(doc)


def test_rejects_runtime_env_drift():
    doc = copy.deepcopy(next(d for d in KUBERAY_DOCS if d["kind"] == "RayJob"))
    doc["spec"]["runtimeEnvYAML"] = doc["spec"]["runtimeEnvYAML"].replace('HF_HUB_OFFLINE: "1"', 'HF_HUB_OFFLINE: "0"')
    with pytest.raises(AssertionError, match="runtimeEnvYAML"):
        check_rayjob(doc)


@pytest.mark.parametrize("command, error", [
    ("python jobs/train_stage.py --stage le --sett optim.lr=1e-4", "rejects"),
    ("python jobs/train_stage.py --stage lee", "rejects"),
    ("python jobs/train_stage.py --stage le --set optim.lrr=1e-4", "optim.lrr"),
    ("python jobs/train_stage.py --stage le --set optim.lr=-1", "optim.lr"),
    ("python jobs/evaluate.py", "rejects"),
    ("python jobs/tune.py --stage le --space 'optim.lrr=loguniform(1e-5,1e-3)'", "optim.lrr"),
    ("python jobs/no_such_job.py --stage le", "does not exist"),
])
def test_rejects_bad_entrypoint(command, error):
    (argv,) = job_invocations(command)
    with pytest.raises((AssertionError, ValueError, pytest.fail.Exception), match=error):
        check_entrypoint(argv)


def test_rejects_constraints_drift():
    cpu = (REPO / "constraints.txt").read_text()
    gpu = (REPO / "constraints-gpu.txt").read_text()
    with pytest.raises(AssertionError, match="numpy"):
        check_gpu_constraints(cpu, re.sub(r"^numpy==.*$", "numpy==1.0.0", gpu, flags=re.M))
    with pytest.raises(AssertionError, match="CUDA"):
        check_gpu_constraints(cpu, gpu.replace("torch==2.13.0+cu", "torch==2.13.0+rocm"))


def test_job_invocations_split_shell_lines():
    line = "cd /x && python jobs/evaluate.py ckpt --split test | tee out.txt # comment"
    assert job_invocations(line) == [["python", "jobs/evaluate.py", "ckpt", "--split", "test"]]
    assert expand("--out $STORE/x ${STORE}/y $OTHER", {"STORE": "s3://b"}) == "--out s3://b/x s3://b/y $OTHER"
