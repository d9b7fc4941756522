"""The Kubernetes deployment files, checked offline (no cluster, no container runtime here).

- Every manifest in deploy/k8s (and the Secrets kustomization.yaml generates) validates against
  the Kubernetes 1.37 OpenAPI schemas shipped inside `kubernetes-validate`, in strict mode
  (unknown fields are errors).
- Workloads: every Secret, ConfigMap (and key) and PVC they use exists in the manifests; every
  container runs the fedbus image; the fedbus containers' arguments parse with fedbus's own CLI
  parser and point at mounted files; keys are mounted read-only; the pod security rules of the
  "restricted" Pod Security Standard hold; no probe assumes an HTTP or TCP endpoint.
- The job spec and federation file in the ConfigMap load with fedbus's own loaders, and each
  workload's id, role and region match the federation.
- deploy/helm: the NATS chart values validate against deploy/helm/nats-chart-values.schema.json
  (a schema written here for the subset of the chart's 1.x values tree; the chart ships none).
- The Dockerfile pins the same torch as pyproject.toml and runs as the manifests' uid.

Each check also runs on a broken copy, which it must refuse.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from fedbus.cli import build_parser
from fedbus.crypto.federation import Federation
from fedbus.jobspec import JobSpec

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
HELM = ROOT / "deploy" / "helm"
K8S_VERSION = "1.37"
IMAGE_NAME = "fedbus"
KEY_DIR = "/var/run/fedbus/key"
MANUAL = {"coordinator-resume.yaml"}  # applied by hand after a coordinator failure, not by kustomize


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _load_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in _manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


DOCS = _load_docs()
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _generated_secrets(kustomization: dict) -> list[dict]:
    """The Secrets kustomize's secretGenerator makes (names fixed: disableNameSuffixHash), with dummy data."""
    assert kustomization.get("generatorOptions", {}).get("disableNameSuffixHash") is True
    secrets = []
    for gen in kustomization.get("secretGenerator", []):
        data = {}
        for entry in gen.get("files", []):
            key, _, source = entry.partition("=")
            assert source, f"secretGenerator {gen['name']}: write key=path, not {entry!r}"
            data[key] = "ZHVtbXk="  # base64 placeholder: the real key file is never in the repository
        secrets.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                        "metadata": {"name": gen["name"], "namespace": kustomization["namespace"]}, "data": data})
    return secrets


def _pod_spec(doc: dict) -> dict | None:
    kind = doc["kind"]
    if kind == "Pod":
        return doc["spec"]
    if kind in {"Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}:
        return doc["spec"]["template"]["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


WORKLOADS = [(f, d) for f, d in DOCS if _pod_spec(d) is not None]


# ---- Kubernetes schemas --------------------------------------------------------------------


def _schema_errors(doc: dict) -> str | None:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return f"{'.'.join(map(str, exc.path))}: {exc.message}"
    return None


@pytest.mark.parametrize("name,doc", DOCS, ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCS])
def test_manifest_validates_against_kubernetes_schema(name, doc):
    # SchemaNotFoundError (an unknown kind or apiVersion) propagates and fails the test too.
    assert _schema_errors(doc) is None, f"{name}: {_schema_errors(doc)}"


def test_generated_secrets_validate_against_kubernetes_schema():
    secrets = _generated_secrets(KUSTOMIZATION)
    assert secrets
    for secret in secrets:
        assert _schema_errors(secret) is None, secret["metadata"]["name"]


def test_the_schemas_are_offline_and_refuse_broken_manifests():
    # The schemas come from inside the package (no download), and they do refuse things.
    assert K8S_VERSION in kubernetes_validate.utils.all_versions() or \
        any(v.startswith(K8S_VERSION + ".") for v in kubernetes_validate.utils.all_versions())
    job = copy.deepcopy(next(d for _, d in DOCS if d["kind"] == "Job"))
    assert _schema_errors(job) is None
    ctr = _pod_spec(job)["containers"][0]
    broken = []
    b = copy.deepcopy(job); _pod_spec(b)["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    broken.append(b)  # misspelled field (strict mode)
    b = copy.deepcopy(job); b["spec"]["backoffLimit"] = "six"
    broken.append(b)  # wrong type
    b = copy.deepcopy(job); del _pod_spec(b)["containers"][0]["name"]
    broken.append(b)  # required field missing
    b = copy.deepcopy(job); _pod_spec(b)["volumes"][0]["secret"]["defaultMode"] = "0400"
    broken.append(b)  # a mode as a string
    for doc in broken:
        assert _schema_errors(doc) is not None
    assert ctr["name"] == "fedbus"
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate({**job, "apiVersion": "batch/v9"}, K8S_VERSION, strict=True)


# ---- kustomization -------------------------------------------------------------------------


def test_kustomization_lists_every_manifest():
    listed = set(KUSTOMIZATION["resources"])
    files = {p.name for p in _manifest_files()}
    assert listed <= files, f"listed but missing: {listed - files}"
    assert files - listed == MANUAL, f"not listed: {files - listed - MANUAL}"
    assert {i["name"] for i in KUSTOMIZATION["images"]} == {IMAGE_NAME}
    assert all(d["metadata"].get("namespace", KUSTOMIZATION["namespace"]) == KUSTOMIZATION["namespace"]
               for _, d in DOCS if d["kind"] != "Namespace")


def test_key_files_are_never_committed():
    ignore = (K8S / "keys" / ".gitignore").read_text().split()
    assert "*" in ignore  # everything in deploy/k8s/keys is ignored but the .gitignore itself
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert "**/*.key" in dockerignore


# ---- workload checks -----------------------------------------------------------------------


def _resources(docs: list[dict], kustomization: dict) -> dict[str, dict]:
    out = {"ConfigMap": {}, "Secret": {}, "PersistentVolumeClaim": {}}
    for doc in docs:
        if doc["kind"] in out:
            out[doc["kind"]][doc["metadata"]["name"]] = doc
    for secret in _generated_secrets(kustomization):
        out["Secret"][secret["metadata"]["name"]] = secret
    return out


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _issue_aggregator_parser() -> argparse.ArgumentParser:
    """The aggregator command line as issue 9 specifies it; used only while fedbus.cli has no
    `aggregator` sub-command yet (then the real parser is used, see _parse_fedbus_args)."""
    p = argparse.ArgumentParser(prog="fedbus aggregator (issue 9 command line)", exit_on_error=False)
    for flag in ("--job", "--federation", "--key", "--id", "--region", "--nats"):
        p.add_argument(flag, required=True)
    return p


class _ParseError(Exception):
    pass


def _parse_fedbus_args(args: list[str]) -> argparse.Namespace:
    parser = build_parser()
    if args and args[0] == "aggregator" and "aggregator" not in _subcommands(parser):
        try:
            ns, extra = _issue_aggregator_parser().parse_known_args(args[1:])
        except (argparse.ArgumentError, SystemExit) as exc:
            raise _ParseError(str(exc)) from None
        if extra:
            raise _ParseError(f"unrecognized arguments: {' '.join(extra)}")
        ns.command = "aggregator"
        return ns
    try:
        return parser.parse_args(args)
    except SystemExit as exc:  # argparse's way of refusing (exit code 2)
        raise _ParseError(f"fedbus {shlex.join(args)}: refused by the CLI parser (exit {exc.code})") from None


def _load_federation_text(text: str) -> Federation:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "federation.yaml"
        path.write_text(text)
        return Federation.load(path)


def _image_name(image: str) -> str:
    return image.rsplit("@", 1)[0].rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image.rsplit("@", 1)[0]


def workload_problems(doc: dict, resources: dict) -> list[str]:
    """Everything wrong with one workload; [] when it passes."""
    problems: list[str] = []
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    spec = _pod_spec(doc)
    psc = spec.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            problems.append(f"{where}: {flag} is set")
    if psc.get("runAsNonRoot") is not True or psc.get("runAsUser") in (None, 0):
        problems.append(f"{where}: the pod must set runAsNonRoot: true and a non-zero runAsUser")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: seccompProfile must be RuntimeDefault")
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: fedbus needs no Kubernetes API token (automountServiceAccountToken: false)")

    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for name, vol in volumes.items():
        if "hostPath" in vol:
            problems.append(f"{where}: volume {name} is a hostPath")
        if "secret" in vol:
            sec = vol["secret"]
            secret = resources["Secret"].get(sec["secretName"])
            if secret is None:
                problems.append(f"{where}: Secret {sec['secretName']} is not in the manifests or kustomization")
            if sec.get("defaultMode") != 0o400 or any(i.get("mode", 0o400) != 0o400 for i in sec.get("items", [])):
                problems.append(f"{where}: Secret volume {name} must use mode 0400")
            for item in sec.get("items", []):
                if secret is not None and item["key"] not in secret.get("data", {}) | secret.get("stringData", {}):
                    problems.append(f"{where}: Secret {sec['secretName']} has no key {item['key']}")
        if "configMap" in vol:
            if vol["configMap"]["name"] not in resources["ConfigMap"]:
                problems.append(f"{where}: ConfigMap {vol['configMap']['name']} is not in the manifests")
        if "persistentVolumeClaim" in vol:
            if vol["persistentVolumeClaim"]["claimName"] not in resources["PersistentVolumeClaim"]:
                problems.append(f"{where}: PVC {vol['persistentVolumeClaim']['claimName']} is not in the manifests")

    init = {c["name"]: c for c in spec.get("initContainers", [])}
    for ctr in spec.get("initContainers", []) + spec["containers"]:
        cw = f"{where} container {ctr['name']}"
        if _image_name(ctr.get("image", "")) != IMAGE_NAME:
            problems.append(f"{cw}: image {ctr.get('image')!r} is not the fedbus image")
        sc = ctr.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False or sc.get("privileged"):
            problems.append(f"{cw}: must set allowPrivilegeEscalation: false and not be privileged")
        if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
            problems.append(f"{cw}: must drop ALL capabilities and add none")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{cw}: readOnlyRootFilesystem must be true")
        for kind in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(ctr.get("resources", {}).get(kind, {})):
                problems.append(f"{cw}: resources.{kind} must set cpu and memory")
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in ctr and set(ctr[probe]) & {"httpGet", "tcpSocket", "grpc"}:
                problems.append(f"{cw}: {probe} assumes a network endpoint fedbus does not have")
        for mount in ctr.get("volumeMounts", []):
            vol = volumes.get(mount["name"])
            if vol is None:
                problems.append(f"{cw}: mounts undefined volume {mount['name']}")
            elif "secret" in vol and mount.get("readOnly") is not True:
                problems.append(f"{cw}: Secret volume {mount['name']} must be mounted readOnly")
        for env in ctr.get("env", []):
            ref = env.get("valueFrom", {})
            if "configMapKeyRef" in ref:
                cm = resources["ConfigMap"].get(ref["configMapKeyRef"]["name"])
                if cm is None or ref["configMapKeyRef"]["key"] not in cm.get("data", {}):
                    problems.append(f"{cw}: env {env['name']} refers to a missing ConfigMap key")
            if "secretKeyRef" in ref:
                sec = resources["Secret"].get(ref["secretKeyRef"]["name"])
                if sec is None or ref["secretKeyRef"]["key"] not in sec.get("data", {}):
                    problems.append(f"{cw}: env {env['name']} refers to a missing Secret key")
        for src in ctr.get("envFrom", []):
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in src and src[key]["name"] not in resources[kind]:
                    problems.append(f"{cw}: envFrom {kind} {src[key]['name']} is missing")

    # The init container that copies the key out of the Secret: `install -m 0400 SECRET/x KEYDIR/x`.
    for ctr in spec.get("initContainers", []):
        cmd = ctr.get("command", [])
        mounts = {m["mountPath"]: m for m in ctr.get("volumeMounts", [])}
        ok = (len(cmd) == 5 and cmd[:3] == ["install", "-m", "0400"] and ctr.get("args") is None)
        if ok:
            src_dir, dst_dir = str(Path(cmd[3]).parent), str(Path(cmd[4]).parent)
            src_vol = volumes.get(mounts.get(src_dir, {}).get("name", ""), {})
            dst_vol = volumes.get(mounts.get(dst_dir, {}).get("name", ""), {})
            ok = ("secret" in src_vol and mounts[src_dir].get("readOnly") is True
                  and dst_vol.get("emptyDir", {}).get("medium") == "Memory" and dst_dir == KEY_DIR
                  and Path(cmd[3]).name == Path(cmd[4]).name)
        if not ok:
            problems.append(f"{where} init container {ctr['name']}: must only `install -m 0400` a key from a "
                            f"read-only Secret mount into the in-memory {KEY_DIR}")

    for ctr in spec["containers"]:
        cw = f"{where} container {ctr['name']}"
        if ctr.get("command") not in (None, ["fedbus"]):
            problems.append(f"{cw}: command {ctr.get('command')} overrides the fedbus ENTRYPOINT")
            continue
        env_names = {e["name"] for e in ctr.get("env", [])}
        args = []
        for arg in ctr.get("args", []):
            for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                if var not in env_names:
                    problems.append(f"{cw}: $({var}) in args is not defined in env (Kubernetes would pass it as is)")
            args.append(re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", "nats://resolved.example:4222", arg))
        try:
            ns = _parse_fedbus_args(args)
        except _ParseError as exc:
            problems.append(f"{cw}: {exc}")
            continue
        problems += _role_problems(cw, ns, ctr, volumes, init, resources)
    return problems


def _mount_for(path: str, ctr: dict) -> dict | None:
    best = None
    for m in ctr.get("volumeMounts", []):
        if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/"):
            if best is None or len(m["mountPath"]) > len(best["mountPath"]):
                best = m
    return best


def _role_problems(cw, ns, ctr, volumes, init, resources) -> list[str]:
    problems = []
    if ns.command not in {"coordinator", "aggregator", "worker"}:
        return [f"{cw}: `fedbus {ns.command}` is not a role that runs in a cluster"]
    for flag in ("job", "federation"):
        path = getattr(ns, flag)
        mount = _mount_for(path, ctr)
        vol = volumes.get(mount["name"], {}) if mount else {}
        cm = resources["ConfigMap"].get(vol.get("configMap", {}).get("name", ""))
        if cm is None or Path(path).name not in cm.get("data", {}) or not mount.get("readOnly"):
            problems.append(f"{cw}: --{flag} {path} is not a file of a read-only ConfigMap mount")
    key_mount = _mount_for(ns.key, ctr)
    if key_mount is None or key_mount["mountPath"] != KEY_DIR or key_mount.get("readOnly") is not True:
        problems.append(f"{cw}: --key {ns.key} must be read from the read-only key mount {KEY_DIR}")
    elif not any(c.get("command", [None])[-1] == ns.key for c in init.values()):
        problems.append(f"{cw}: no init container installs {ns.key}")
    for flag in ("run_dir", "state_dir"):
        path = getattr(ns, flag, None)
        if path:
            mount = _mount_for(path, ctr)
            if mount is None or "persistentVolumeClaim" not in volumes.get(mount["name"], {}) or mount.get("readOnly"):
                problems.append(f"{cw}: --{flag.replace('_', '-')} {path} must be on a writable PVC mount")
    if ns.command == "worker" and not getattr(ns, "state_dir", None):
        problems.append(f"{cw}: a worker needs --state-dir on its PVC (resend after a restart)")
    if "fedbus-job" in resources["ConfigMap"]:
        fed = _load_federation_text(resources["ConfigMap"]["fedbus-job"]["data"]["federation.yaml"])
        key_id = Path(ns.key).stem
        pid = getattr(ns, "id", None) or key_id
        part = next((p for p in fed.spec.participants if p.id == pid), None)
        if part is None or key_id != pid:
            problems.append(f"{cw}: participant {pid} (key {key_id}) is not in the federation")
        elif part.role != ns.command:
            problems.append(f"{cw}: {pid} is a {part.role} in the federation, not a {ns.command}")
        elif ns.command == "aggregator" and ns.region != part.region:
            problems.append(f"{cw}: --region {ns.region} but {pid} is in region {part.region}")
        else:
            url_key = next((e["valueFrom"]["configMapKeyRef"]["key"] for e in ctr.get("env", [])
                            if e["name"] == "FEDBUS_NATS_URL" and "configMapKeyRef" in e.get("valueFrom", {})), None)
            want = "hub-url" if ns.command == "coordinator" else f"{part.region}-url"
            if url_key != want:
                problems.append(f"{cw}: a {ns.command} of region {part.region} connects to {url_key}, not {want}")
    return problems


RESOURCES = _resources([d for _, d in DOCS], KUSTOMIZATION)


@pytest.mark.parametrize("name,doc", WORKLOADS, ids=[f"{f}:{d['metadata']['name']}" for f, d in WORKLOADS])
def test_workload_is_consistent_and_locked_down(name, doc):
    assert workload_problems(doc, RESOURCES) == []


def _worker_job() -> dict:
    return copy.deepcopy(next(d for _, d in WORKLOADS if d["metadata"]["name"] == "fedbus-worker-hospital-a"))


def _main(doc):
    return _pod_spec(doc)["containers"][0]


def _arg_after(ctr, flag):
    return ctr["args"].index(flag) + 1


BREAKAGES = {
    "hostNetwork": lambda d: _pod_spec(d).__setitem__("hostNetwork", True),
    "key mount writable": lambda d: next(m for m in _main(d)["volumeMounts"] if m["name"] == "key").pop("readOnly"),
    "secret mounted writable into init": lambda d: _pod_spec(d)["initContainers"][0]["volumeMounts"][0].pop("readOnly"),
    "secret mode 0440": lambda d: next(v for v in _pod_spec(d)["volumes"] if "secret" in v)["secret"]
        .__setitem__("defaultMode", 0o440),
    "missing Secret": lambda d: next(v for v in _pod_spec(d)["volumes"] if "secret" in v)["secret"]
        .__setitem__("secretName", "fedbus-key-nobody"),
    "missing ConfigMap key": lambda d: _main(d)["env"][0]["valueFrom"]["configMapKeyRef"].__setitem__("key", "mars-url"),
    "missing PVC": lambda d: next(v for v in _pod_spec(d)["volumes"] if "persistentVolumeClaim" in v)
        ["persistentVolumeClaim"].__setitem__("claimName", "nope"),
    "other image": lambda d: _main(d).__setitem__("image", "python:3.11-slim"),
    "shell command": lambda d: _main(d).__setitem__("command", ["sh", "-c"]),
    "flag fedbus lacks": lambda d: _main(d)["args"].__setitem__(_arg_after(_main(d), "--state-dir") - 1, "--stat-dir"),
    "unknown role": lambda d: _main(d)["args"].__setitem__(0, "trainer"),
    "undefined $(VAR)": lambda d: _main(d)["args"].__setitem__(_arg_after(_main(d), "--nats"), "$(NATS)"),
    "id of another worker": lambda d: _main(d)["args"].__setitem__(_arg_after(_main(d), "--id"), "clinic-c"),
    "job file not mounted": lambda d: _main(d)["args"].__setitem__(_arg_after(_main(d), "--job"), "/tmp/job.yaml"),
    "state dir off the PVC": lambda d: _main(d)["args"].__setitem__(_arg_after(_main(d), "--state-dir"), "/tmp/s"),
    "wrong region's NATS": lambda d: _main(d)["env"][0]["valueFrom"]["configMapKeyRef"].__setitem__("key", "us-url"),
    "capabilities kept": lambda d: _main(d)["securityContext"].pop("capabilities"),
    "root filesystem writable": lambda d: _main(d)["securityContext"].__setitem__("readOnlyRootFilesystem", False),
    "runs as root": lambda d: _pod_spec(d)["securityContext"].__setitem__("runAsUser", 0),
    "no limits": lambda d: _main(d)["resources"].pop("limits"),
    "HTTP liveness probe": lambda d: _main(d).__setitem__("livenessProbe", {"httpGet": {"path": "/", "port": 8080}}),
    "init container runs a shell": lambda d: _pod_spec(d)["initContainers"][0].__setitem__(
        "command", ["sh", "-c", "cp /var/run/fedbus/secret/k /var/run/fedbus/key/k"]),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_a_broken_workload_is_refused(breakage):
    doc = _worker_job()
    assert workload_problems(doc, RESOURCES) == []
    BREAKAGES[breakage](doc)
    assert workload_problems(doc, RESOURCES), f"{breakage} was not noticed"


def test_aggregator_command_line():
    """Checked with fedbus's parser once `fedbus aggregator` exists; until then against issue 9's command line."""
    aggs = [d for _, d in WORKLOADS if d["metadata"]["labels"].get("app.kubernetes.io/component") == "aggregator"]
    assert {d["metadata"]["labels"]["fedbus.io/region"] for d in aggs} == {"eu", "us"}
    for doc in aggs:
        ns = _parse_fedbus_args([a.replace("$(FEDBUS_NATS_URL)", "nats://x:4222") for a in _main(doc)["args"]])
        assert ns.command == "aggregator" and ns.region == doc["metadata"]["labels"]["fedbus.io/region"]
    with pytest.raises(_ParseError):
        _parse_fedbus_args(["aggregator", "--job", "j", "--federation", "f", "--key", "k", "--id", "a"])


# ---- the job spec and federation in the ConfigMap --------------------------------------------


def test_job_spec_and_federation_load_with_fedbus_loaders(tmp_path):
    data = RESOURCES["ConfigMap"]["fedbus-job"]["data"]
    (tmp_path / "job.yaml").write_text(data["job.yaml"])
    job = JobSpec.load(tmp_path / "job.yaml")
    fed = _load_federation_text(data["federation.yaml"])
    roles = {p.id: p.role for p in fed.spec.participants}
    # every participant runs somewhere, and nothing runs that is not a participant
    running = {d["metadata"]["labels"]["fedbus.io/participant"] for _, d in WORKLOADS}
    assert running == set(roles)
    if job.topology == "regional":
        regions = {p.region for p in fed.spec.participants if p.role == "worker"}
        assert regions == {p.region for p in fed.spec.participants if p.role == "aggregator"}
    assert job.cohort.min_workers <= sum(r == "worker" for r in roles.values())
    # and the loader does refuse a broken spec
    (tmp_path / "bad.yaml").write_text(data["job.yaml"].replace("rounds: 20", "rounds: 0"))
    with pytest.raises(ValueError):
        JobSpec.load(tmp_path / "bad.yaml")


def test_coordinator_start_never_retries_and_resume_does():
    start = next(d for _, d in WORKLOADS if d["metadata"]["name"] == "fedbus-coordinator")
    resume = next(d for _, d in WORKLOADS if d["metadata"]["name"] == "fedbus-coordinator-resume")
    assert "--resume" not in _main(start)["args"] and start["spec"]["backoffLimit"] == 0
    assert "--resume" in _main(resume)["args"] and resume["spec"]["backoffLimit"] > 0
    # both write to the same run directory, so summary.json continues across incarnations
    runs = [_parse_fedbus_args([a.replace("$(FEDBUS_NATS_URL)", "n") for a in _main(d)["args"]]).run_dir
            for d in (start, resume)]
    assert runs[0] == runs[1]


# ---- Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_matches_project_and_manifests():
    text = (ROOT / "Dockerfile").read_text()
    pins = re.findall(r"\"torch==([0-9.]+)\"", (ROOT / "pyproject.toml").read_text())
    assert pins and set(re.findall(r"torch==([0-9.]+)", text)) == set(pins)
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert "https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"pip install \.(\s|$)", text)
    user = re.findall(r"^USER (\d+)(?::(\d+))?$", text, re.M)
    assert user and user[-1][0] != "0"
    uids = {_pod_spec(d)["securityContext"]["runAsUser"] for _, d in WORKLOADS}
    assert uids == {int(user[-1][0])}
    assert re.search(r'^ENTRYPOINT \["fedbus"\]$', text, re.M)


# ---- NATS Helm chart values ----------------------------------------------------------------

VALUES_SCHEMA = json.loads((HELM / "nats-chart-values.schema.json").read_text())


def _values_errors(values: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(VALUES_SCHEMA)
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(values)]


def _values(name: str) -> dict:
    return yaml.safe_load((HELM / name).read_text())


@pytest.mark.parametrize("name", ["nats-values.yaml", "nats-leaf-values.yaml"])
def test_nats_values_use_only_chart_keys(name):
    assert _values_errors(_values(name)) == []


@pytest.mark.parametrize("name", ["nats-values.yaml", "nats-leaf-values.yaml"])
def test_nats_values_kubernetes_fragments_validate(name):
    """What the chart merges into Kubernetes objects (container.merge, env, topology spread) is valid there."""
    values = _values(name)
    env = [{"name": k, **({"value": v} if isinstance(v, str) else v)} for k, v in values["container"]["env"].items()]
    spread = [{"topologyKey": key, "labelSelector": {"matchLabels": {"app": "nats"}}, **c}
              for key, c in values.get("podTemplate", {}).get("topologySpreadConstraints", {}).items()]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nats-0"},
           "spec": {"containers": [{"name": "nats", "image": "nats", "env": env, **values["container"]["merge"]}],
                    "topologySpreadConstraints": spread, **values.get("podTemplate", {}).get("merge", {}).get("spec", {})}}
    assert _schema_errors(pod) is None, _schema_errors(pod)


def test_nats_values_describe_hub_cluster_jetstream_and_leaves():
    hub, leaf = _values("nats-values.yaml"), _values("nats-leaf-values.yaml")
    for values in (hub, leaf):
        cfg = values["config"]
        assert cfg["cluster"]["enabled"] and cfg["cluster"]["replicas"] == 3
        js = cfg["jetstream"]
        assert js["enabled"] and js["fileStore"]["enabled"] and js["fileStore"]["pvc"]["enabled"]
        assert js["fileStore"]["pvc"]["size"]
        assert cfg["leafnodes"]["enabled"]
    job = yaml.safe_load(RESOURCES["ConfigMap"]["fedbus-job"]["data"]["job.yaml"])
    assert job["transport"]["replicas"] <= hub["config"]["cluster"]["replicas"]
    # distinct JetStream domains: the region's update stream stays in the region
    assert hub["config"]["jetstream"]["merge"]["domain"] != leaf["config"]["jetstream"]["merge"]["domain"]
    # the hub accepts leaf connections into the account the region binds its remote to
    hub_account = hub["config"]["leafnodes"]["merge"]["authorization"]["account"]
    remotes = leaf["config"]["leafnodes"]["merge"]["remotes"]
    assert remotes and all(r["account"] == hub_account for r in remotes)
    assert hub_account in hub["config"]["merge"]["accounts"] and hub_account in leaf["config"]["merge"]["accounts"]
    assert hub["service"]["ports"]["leafnodes"]["enabled"] is True
    # every env var a << $VAR >> refers to is defined in the container env
    for values in (hub, leaf):
        used = set(re.findall(r"<< \$([A-Z_]+) >>", yaml.safe_dump(values)))
        assert used and used <= set(values["container"]["env"])


@pytest.mark.parametrize("breakage", [
    ("0.x layout", lambda v: v.__setitem__("nats", {"jetstream": {"enabled": True, "fileStorage": {"enabled": True}}})),
    ("0.x top-level cluster", lambda v: v.__setitem__("cluster", {"enabled": True, "replicas": 3})),
    ("misspelled fileStore", lambda v: v["config"]["jetstream"].__setitem__("filestore", v["config"]["jetstream"]
                                                                            .pop("fileStore"))),
    ("replicas as text", lambda v: v["config"]["cluster"].__setitem__("replicas", "three")),
    ("bad PVC size", lambda v: v["config"]["jetstream"]["fileStore"]["pvc"].__setitem__("size", "20 GB")),
    ("unknown leafnodes key", lambda v: v["config"]["leafnodes"].__setitem__("remotes", [])),
], ids=lambda b: b[0] if isinstance(b, tuple) else None)
def test_broken_nats_values_are_refused(breakage):
    values = _values("nats-values.yaml")
    breakage[1](values)
    assert _values_errors(values)
