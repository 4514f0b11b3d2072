#!/usr/bin/env python3
"""Offline validation of ditrun's Kubernetes manifests (k8s/), with no cluster.

    validate-k8s.py [--ditrun BIN] [--kubernetes-version X.Y] [PATH ...]     (default: k8s/)

PATHs are YAML files or folders (searched recursively for *.yaml / *.yml). Run it with the
venv's python (scripts/python-venv.sh), which has kubernetes-validate and jsonschema.

Every YAML document is checked:
  - built-in kinds (ConfigMap, Secret, Job, Deployment, Service, ...) with kubernetes-validate
    in strict mode against Kubernetes KUBERNETES_VERSION's own schemas: wrong types, missing
    required fields and unknown fields (a typo such as `imagePullPolicyy`) are errors;
  - custom resources against a JSON Schema in k8s/schemas/ (the MPIJob: mpijob-v2beta1.json),
    whose pod templates $ref the strict core PodTemplateSpec of the same Kubernetes version;
  - kustomization.yaml: a Kustomization whose `resources` name files that exist and parse.
Then what ties the manifests to ditrun:
  - a ConfigMap's `job.yaml` is self-contained (no `recipe:`) and passes `ditrun inspect`
    (binary from --ditrun or $DITRUN_BIN; without one this check is skipped, and says so);
  - a container running `ditrun ... --job FILE` mounts FILE from a ConfigMap that has it (for
    an MPIJob, every replica: the ranks run on the workers);
  - ConfigMaps and Secrets that pods use are defined among the manifests; a workload's
    selector matches its pod template, a Service's selector some pod template;
  - an MPIJob's ranks (mpirun -np, or ditrun launch --nnodes x --nproc-per-node) = Worker replicas x slotsPerWorker, slotsPerWorker = the Worker's
    nvidia.com/gpu, and the job's train.batch_size is a multiple of the ranks;
  - a pod running ranks has a terminationGracePeriodSeconds above the job's
    train.stop_grace_secs (the final checkpoint after a SIGTERM);
  - a TensorBoard Deployment reads the job's logging.dir.

One line per document (and per cross-check): OK or FAIL, file, kind/name, the error and its
path in the document. Exit status 1 if anything failed, 2 on a usage error.

What it cannot know without a cluster: whether the CRD installed in the cluster is the one the
schema describes, admission webhooks and policies, quotas, whether images, nodes with GPUs,
the Secret's real values or the buckets exist.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

try:
    import jsonschema
    import kubernetes_validate
    import kubernetes_validate.utils as kv_utils
    from referencing import Registry, Resource
except ImportError as e:  # a message instead of a traceback
    print(
        f"validate-k8s: {e}: run this with the venv's python "
        "(`$(bash scripts/python-venv.sh) scripts/validate-k8s.py`)",
        file=sys.stderr,
    )
    sys.exit(2)

# The Kubernetes version whose API schemas the manifests must satisfy. kubernetes-validate
# (pinned in scripts/python-venv.sh) ships schemas for 1.25 to 1.37.
KUBERNETES_VERSION = "1.30"

REPO = Path(__file__).resolve().parent.parent
SCHEMA_DIR = REPO / "k8s" / "schemas"
# Custom resources: (apiVersion, kind) -> JSON Schema file in SCHEMA_DIR.
CUSTOM_SCHEMAS = {("kubeflow.org/v2beta1", "MPIJob"): "mpijob-v2beta1.json"}
KUSTOMIZATION_NAMES = {"kustomization.yaml", "kustomization.yml", "Kustomization"}
# Top-level fields of a Kustomization (kustomize v5) this checker accepts.
KUSTOMIZATION_FIELDS = {
    "apiVersion",
    "kind",
    "metadata",
    "resources",
    "components",
    "namespace",
    "namePrefix",
    "nameSuffix",
    "labels",
    "commonLabels",
    "commonAnnotations",
    "images",
    "replicas",
    "patches",
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
    "replacements",
    "buildMetadata",
    "sortOptions",
    "openapi",
    "crds",
}


def die(message):
    """A usage error (bad path, missing package or schema version): exit status 2."""
    print(f"validate-k8s: {message}", file=sys.stderr)
    sys.exit(2)


def rel(path):
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def json_path(parts):
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(document)"


class Doc:
    def __init__(self, file, index, obj, line):
        self.file, self.index, self.obj, self.line = file, index, obj, line

    @property
    def kind(self):
        return self.obj.get("kind", "?") if isinstance(self.obj, dict) else "?"

    @property
    def name(self):
        if not isinstance(self.obj, dict):
            return "?"
        metadata = self.obj.get("metadata")
        return (metadata or {}).get("name", "?") if isinstance(metadata, dict) else "?"

    def label(self):
        if self.kind == "Kustomization" and self.name == "?":
            return "Kustomization"
        return f"{self.kind}/{self.name}"


class Report:
    def __init__(self):
        self.failures = 0
        self.skipped = 0

    def ok(self, file, what, note=""):
        print(f"OK    {rel(file)}  {what}" + (f": {note}" if note else ""))

    def fail(self, file, what, message):
        self.failures += 1
        print(f"FAIL  {rel(file)}  {what}: {message}")

    def skip(self, file, what, message):
        self.skipped += 1
        print(f"SKIP  {rel(file)}  {what}: {message}")


def yaml_files(paths):
    files = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml"))
        elif path.is_file():
            files.append(path)
        else:
            die(f"{path}: no such file or folder")
    return files


def load_docs(file, report):
    """The file's documents (empty ones skipped), each with the line it starts on."""
    try:
        text = file.read_text()
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        objs = list(yaml.safe_load_all(text))
    except (OSError, yaml.YAMLError) as e:
        report.fail(file, "(file)", "not valid YAML: " + " ".join(str(e).split()))
        return []
    docs = []
    for index, (node, obj) in enumerate(zip(nodes, objs)):
        if obj is None:
            continue
        if not isinstance(obj, dict):
            report.fail(file, f"document {index + 1}", "is not a mapping")
            continue
        docs.append(Doc(file, index, obj, node.start_mark.line + 1))
    return docs


# ---- schemas -------------------------------------------------------------------------------


def core_definitions(version):
    """Kubernetes' strict definitions (PodTemplateSpec, ObjectMeta, ...) of `version`."""
    folder = f"v{version}.0-local-strict"
    schemas = Path(kv_utils.__file__).parent / "kubernetes-json-schema" / folder
    if not schemas.is_dir():
        shipped = sorted(set(kv_utils.all_versions()), key=kv_utils.Version)
        die(
            f"kubernetes-validate {kubernetes_validate.__version__} has no schemas for "
            f"Kubernetes {version} (it has {', '.join(shipped)})"
        )
    return json.loads((schemas / "_definitions.json").read_text())


def validate_core(doc, version, report):
    try:
        kubernetes_validate.validate(doc.obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        report.fail(doc.file, doc.label(), f"at {json_path(e.path)}: {e.message}")
        return False
    except kubernetes_validate.SchemaNotFoundError:
        report.fail(
            doc.file,
            doc.label(),
            f"no schema for apiVersion {doc.obj.get('apiVersion')!r} kind {doc.kind!r} in "
            f"Kubernetes {version} (a custom resource needs a schema in k8s/schemas/ and an "
            "entry in CUSTOM_SCHEMAS)",
        )
        return False
    except (kv_utils.VersionNotSupportedError, kubernetes_validate.InvalidSchemaError) as e:
        die(e.message)
    return True


def validate_custom(doc, schema_file, definitions, report):
    schema = json.loads((SCHEMA_DIR / schema_file).read_text())
    registry = Registry().with_resource(definitions["$id"], Resource.from_contents(definitions))
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    errors = sorted(validator.iter_errors(doc.obj), key=lambda e: list(map(str, e.absolute_path)))
    for error in errors:
        report.fail(
            doc.file,
            doc.label(),
            f"at {json_path(error.absolute_path)}: {error.message} "
            f"(schema k8s/schemas/{schema_file})",
        )
    return not errors


def validate_kustomization(doc, report):
    obj, ok = doc.obj, True
    if (
        obj.get("apiVersion") != "kustomize.config.k8s.io/v1beta1"
        or obj.get("kind") != "Kustomization"
    ):
        report.fail(
            doc.file,
            doc.label(),
            "want apiVersion kustomize.config.k8s.io/v1beta1, kind Kustomization",
        )
        ok = False
    unknown = sorted(set(obj) - KUSTOMIZATION_FIELDS)
    if unknown:
        report.fail(doc.file, doc.label(), f"unknown fields: {', '.join(unknown)}")
        ok = False
    resources = obj.get("resources")
    if not isinstance(resources, list) or not resources:
        report.fail(doc.file, doc.label(), "at resources: want a non-empty list of files")
        return False
    for i, resource in enumerate(resources):
        path = doc.file.parent / str(resource)
        if not isinstance(resource, str) or not path.is_file():
            report.fail(
                doc.file, doc.label(), f"at resources[{i}]: {resource!r} is not a file beside it"
            )
            ok = False
            continue
        try:
            if not [d for d in yaml.safe_load_all(path.read_text()) if d]:
                report.fail(
                    doc.file, doc.label(), f"at resources[{i}]: {resource} holds no document"
                )
                ok = False
        except yaml.YAMLError as e:
            report.fail(
                doc.file,
                doc.label(),
                f"at resources[{i}]: {resource} is not valid YAML: " + " ".join(str(e).split()),
            )
            ok = False
    for i, image in enumerate(obj.get("images") or []):
        extra = (
            set(image) - {"name", "newName", "newTag", "digest"}
            if isinstance(image, dict)
            else {"?"}
        )
        if extra or "name" not in image:
            report.fail(
                doc.file, doc.label(), f"at images[{i}]: want name, newName, newTag, digest"
            )
            ok = False
    return ok


# ---- what ties the manifests to ditrun ----------------------------------------------------


def pod_specs(doc):
    """(where, pod spec) of every pod the document creates."""
    obj, kind = doc.obj, doc.kind
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return [("spec", spec)]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [("spec.template.spec", (spec.get("template") or {}).get("spec") or {})]
    if kind == "CronJob":
        job = (spec.get("jobTemplate") or {}).get("spec") or {}
        return [
            ("spec.jobTemplate.spec.template.spec", (job.get("template") or {}).get("spec") or {})
        ]
    if kind == "MPIJob":
        return [
            (
                f"spec.mpiReplicaSpecs.{role}.template.spec",
                ((replica or {}).get("template") or {}).get("spec") or {},
            )
            for role, replica in (spec.get("mpiReplicaSpecs") or {}).items()
        ]
    return []


def containers(pod):
    return (pod.get("initContainers") or []) + (pod.get("containers") or [])


def argv(container):
    return [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]


def option(args, name):
    for i, arg in enumerate(args[:-1]):
        if arg == name:
            return args[i + 1]
    for arg in args:
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def configmaps_and_secrets(docs):
    configmaps = {d.name: d for d in docs if d.kind == "ConfigMap"}
    secrets = {d.name for d in docs if d.kind == "Secret"}
    return configmaps, secrets


def check_references(docs, report):
    """ConfigMaps and Secrets the pods use are among the manifests."""
    configmaps, secrets = configmaps_and_secrets(docs)
    for doc in docs:
        problems = []
        for where, pod in pod_specs(doc):
            for volume in pod.get("volumes") or []:
                name = (volume.get("configMap") or {}).get("name")
                if "configMap" in volume and name not in configmaps:
                    problems.append(f"{where}.volumes: ConfigMap {name!r} is not defined")
                name = (volume.get("secret") or {}).get("secretName")
                if "secret" in volume and name not in secrets:
                    problems.append(f"{where}.volumes: Secret {name!r} is not defined")
            for container in containers(pod):
                at = f"{where} container {container.get('name')}"
                for source in container.get("envFrom") or []:
                    name = (source.get("secretRef") or {}).get("name")
                    if "secretRef" in source and name not in secrets:
                        problems.append(f"{at}: envFrom Secret {name!r} is not defined")
                    name = (source.get("configMapRef") or {}).get("name")
                    if "configMapRef" in source and name not in configmaps:
                        problems.append(f"{at}: envFrom ConfigMap {name!r} is not defined")
        for problem in problems:
            report.fail(doc.file, doc.label(), problem)


def template_labels(doc):
    """Labels of the pods the document creates (one dict per pod template)."""
    spec = doc.obj.get("spec") or {}
    if doc.kind == "MPIJob":
        templates = [
            (r or {}).get("template") for r in (spec.get("mpiReplicaSpecs") or {}).values()
        ]
    elif doc.kind == "CronJob":
        templates = [((spec.get("jobTemplate") or {}).get("spec") or {}).get("template")]
    elif doc.kind == "Pod":
        templates = [doc.obj]
    else:
        templates = [spec.get("template")]
    return [
        ((t or {}).get("metadata") or {}).get("labels") or {} for t in templates if t is not None
    ]


def check_selectors(docs, report):
    """Workload selectors match their own pod template; a Service selects some pod."""
    pods = [labels for doc in docs for labels in template_labels(doc)]
    for doc in docs:
        spec = doc.obj.get("spec") or {}
        if doc.kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
            wanted = (spec.get("selector") or {}).get("matchLabels") or {}
            labels = template_labels(doc)[0] if template_labels(doc) else {}
            if any(labels.get(k) != v for k, v in wanted.items()):
                report.fail(
                    doc.file,
                    doc.label(),
                    f"at spec.selector.matchLabels: {wanted} does not match the pod template's "
                    f"labels {labels}",
                )
        elif doc.kind == "Service" and spec.get("selector"):
            wanted = spec["selector"]
            if not any(all(labels.get(k) == v for k, v in wanted.items()) for labels in pods):
                report.fail(
                    doc.file, doc.label(), f"at spec.selector: {wanted} selects no pod template"
                )


def job_mount(pod, job_path, configmaps):
    """None if the pod mounts `job_path` from a ConfigMap that has it, else why not."""
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    directory, key = os.path.split(job_path)
    for container in pod.get("containers") or []:
        for mount in container.get("volumeMounts") or []:
            if mount.get("mountPath", "").rstrip("/") != directory:
                continue
            volume = volumes.get(mount.get("name")) or {}
            name = (volume.get("configMap") or {}).get("name")
            if name is None:
                return f"{directory} is not mounted from a ConfigMap"
            data = (configmaps[name].obj.get("data") or {}) if name in configmaps else {}
            if key not in data:
                return f"ConfigMap {name!r} has no key {key!r}"
            return None
    return f"nothing is mounted at {directory}"


def check_job_mounts(docs, report):
    """`ditrun ... --job FILE` finds FILE in a mounted ConfigMap; returns {doc: job path}."""
    configmaps, _ = configmaps_and_secrets(docs)
    used = {}
    for doc in docs:
        specs = pod_specs(doc)
        for where, pod in specs:
            for container in containers(pod):
                args = argv(container)
                job = option(args, "--job")
                if "ditrun" not in args or job is None:
                    continue
                used[doc] = job
                # An MPIJob's ranks run on the workers, whatever pod holds the mpirun.
                targets = specs if doc.kind == "MPIJob" else [(where, pod)]
                for target_where, target in targets:
                    problem = job_mount(target, job, configmaps)
                    if problem:
                        report.fail(
                            doc.file, doc.label(), f"at {target_where}: --job {job}: {problem}"
                        )
    return used


def check_job_configmaps(docs, ditrun, report):
    """Each ConfigMap's job.yaml is self-contained and passes `ditrun inspect`; returns
    {ConfigMap name: the job as written (dict)}."""
    jobs = {}
    for doc in docs:
        if doc.kind != "ConfigMap" or "job.yaml" not in (doc.obj.get("data") or {}):
            continue
        what = f"{doc.label()} job.yaml"
        text = doc.obj["data"]["job.yaml"]
        try:
            job = yaml.safe_load(text)
        except yaml.YAMLError as e:
            report.fail(doc.file, what, "not valid YAML: " + " ".join(str(e).split()))
            continue
        if not isinstance(job, dict):
            report.fail(doc.file, what, "is not a mapping")
            continue
        jobs[doc.name] = job
        if "recipe" in job:
            report.fail(
                doc.file,
                what,
                "uses `recipe:`, whose paths do not exist beside a file mounted from a "
                "ConfigMap: write every section out (`ditrun inspect JOB` prints them)",
            )
            continue
        if ditrun is None:
            report.skip(
                doc.file, what, "ditrun inspect not run: give --ditrun BIN or set DITRUN_BIN"
            )
            continue
        with tempfile.TemporaryDirectory(prefix="validate-k8s-") as tmp:
            path = Path(tmp) / "job.yaml"
            path.write_text(text)
            try:
                result = subprocess.run(
                    [ditrun, "inspect", str(path)], capture_output=True, text=True, timeout=120
                )
            except OSError as e:
                report.fail(doc.file, what, f"cannot run {ditrun}: {e}")
                continue
        if result.returncode != 0:
            message = (result.stderr.strip() or result.stdout.strip()).replace(
                str(path), "job.yaml"
            )
            first = job_text_line(doc)
            message = re.sub(
                r"job\.yaml line (\d+)",
                lambda m: f"job.yaml line {m[1]} (line {first + int(m[1]) - 1} of {doc.file.name})",
                message,
            )
            report.fail(doc.file, what, f"ditrun inspect rejects it: {message}")
            continue
        try:
            jobs[doc.name] = json.loads(result.stdout)["effective"]
        except (ValueError, KeyError):
            report.fail(doc.file, what, "ditrun inspect did not print the resolved job as JSON")
            continue
        report.ok(doc.file, what, f"passes `{rel(ditrun)} inspect`")
    return jobs


def job_text_line(doc):
    """The line of the file where the ConfigMap's job.yaml text begins."""
    text = doc.file.read_text()
    nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    node = nodes[doc.index]
    for key, value in getattr(node, "value", []):
        if getattr(key, "value", None) == "data":
            for k, v in value.value:
                if k.value == "job.yaml":
                    # A block scalar (`|`) starts on the line after its indicator.
                    return v.start_mark.line + (2 if v.style in ("|", ">") else 1)
    return doc.line


def gpus(container):
    limits = (container.get("resources") or {}).get("limits") or {}
    value = limits.get("nvidia.com/gpu")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def batch_size(job):
    return ((job or {}).get("train") or {}).get("batch_size", 64)


def job_for(doc, job_path, docs, jobs):
    """The job (from its ConfigMap) that `doc` runs with --job job_path."""
    for _, pod in pod_specs(doc):
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        for container in pod.get("containers") or []:
            for mount in container.get("volumeMounts") or []:
                if mount.get("mountPath", "").rstrip("/") == os.path.dirname(job_path):
                    name = ((volumes.get(mount.get("name")) or {}).get("configMap") or {}).get(
                        "name"
                    )
                    if name in jobs:
                        return jobs[name]
    return None


def check_sizes(docs, used, jobs, report):
    """Ranks, slots, GPUs and the global batch agree."""
    for doc, job_path in used.items():
        job = job_for(doc, job_path, docs, jobs)
        if doc.kind == "MPIJob":
            spec = doc.obj.get("spec") or {}
            replicas = spec.get("mpiReplicaSpecs") or {}
            worker = replicas.get("Worker") or {}
            slots = spec.get("slotsPerWorker", 1)
            launcher_pod = ((replicas.get("Launcher") or {}).get("template") or {}).get(
                "spec"
            ) or {}
            worker_pod = (worker.get("template") or {}).get("spec") or {}
            np_ = None
            for container in containers(launcher_pod):
                args = argv(container)
                value = option(args, "-np") or option(args, "-n") or option(args, "--np")
                if value is None and "launch" in args:
                    value = launch_ranks(args)
                if value is not None:
                    np_ = value
            problems = []
            ranks = worker.get("replicas", 1) * slots
            if np_ is None:
                problems.append(
                    "the Launcher's mpirun has no -np (nor ditrun launch --nnodes x "
                    "--nproc-per-node)"
                )
            elif str(np_) != str(ranks):
                problems.append(
                    f"the Launcher starts {np_} ranks but Worker replicas x slotsPerWorker = "
                    f"{worker.get('replicas', 1)} x {slots} = {ranks}"
                )
            for container in worker_pod.get("containers") or []:
                count = gpus(container)
                if count is not None and count != slots:
                    problems.append(
                        f"Worker container {container.get('name')} has nvidia.com/gpu {count} "
                        f"but slotsPerWorker is {slots} (one rank per GPU)"
                    )
            if job is not None and batch_size(job) % ranks:
                problems.append(
                    f"train.batch_size {batch_size(job)} is not a multiple of the {ranks} ranks"
                )
            for problem in problems:
                report.fail(doc.file, doc.label(), problem)
            if not problems:
                workers = worker.get("replicas", 1)
                report.ok(
                    doc.file,
                    doc.label(),
                    f"{ranks} ranks = {workers} workers x {slots} slots (GPUs), "
                    f"batch {batch_size(job)}",
                )
        else:
            for where, pod in pod_specs(doc):
                for container in pod.get("containers") or []:
                    count = gpus(container)
                    if (
                        not count
                        or job is None
                        or option(argv(container), "--nproc-per-node") != "auto"
                    ):
                        continue
                    if batch_size(job) % count:
                        report.fail(
                            doc.file,
                            doc.label(),
                            f"train.batch_size {batch_size(job)} is not a multiple of the "
                            f"{count} GPUs (ranks)",
                        )
                    else:
                        report.ok(
                            doc.file,
                            doc.label(),
                            f"{count} ranks (one per GPU), batch {batch_size(job)}",
                        )


def launch_ranks(args):
    """The ranks `ditrun launch --nnodes N --nproc-per-node M` starts (N x M), if numbers."""
    nodes = option(args, "--nnodes") or "1"
    per_node = option(args, "--nproc-per-node")
    if nodes.isdigit() and per_node and per_node.isdigit():
        return int(nodes) * int(per_node)
    return None


def stop_grace_secs(job):
    return float(((job or {}).get("train") or {}).get("stop_grace_secs", 25))


def check_grace(docs, used, jobs, report):
    """A pod that runs ranks gives them, after its SIGTERM, more time than the job takes to
    stop and save (train.stop_grace_secs), or the kubelet's SIGKILL lands mid-checkpoint."""
    for doc, job_path in used.items():
        job = job_for(doc, job_path, docs, jobs)
        if job is None:
            continue
        grace = stop_grace_secs(job)
        for where, pod in pod_specs(doc):
            period = pod.get("terminationGracePeriodSeconds", 30)
            if period <= grace:
                report.fail(
                    doc.file,
                    doc.label(),
                    f"at {where}: terminationGracePeriodSeconds {period} does not cover the "
                    f"job's train.stop_grace_secs {grace:g} (the final checkpoint after SIGTERM)",
                )
            else:
                report.ok(
                    doc.file,
                    doc.label(),
                    f"at {where}: grace {period} s > train.stop_grace_secs {grace:g} s",
                )


def check_tensorboard(docs, jobs, report):
    """A Deployment running TensorBoard reads (syncs) some job's logging.dir."""
    log_dirs = {((job.get("logging") or {}).get("dir")) for job in jobs.values()} - {None, ""}
    for doc in docs:
        for where, pod in pod_specs(doc):
            if not any("tensorboard" in argv(c)[:1] for c in pod.get("containers") or []):
                continue
            values = []
            for container in pod.get("containers") or []:
                values += argv(container)
                values += [str(e.get("value", "")) for e in container.get("env") or []]
            if not log_dirs:
                continue
            if not any(d in value for d in log_dirs for value in values):
                report.fail(
                    doc.file,
                    doc.label(),
                    f"at {where}: reads none of the jobs' logging.dir "
                    f"({', '.join(sorted(log_dirs))})",
                )
            else:
                report.ok(doc.file, doc.label(), "reads the job's logging.dir")


# ---- main ---------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", default=[str(REPO / "k8s")])
    parser.add_argument(
        "--ditrun",
        default=os.environ.get("DITRUN_BIN") or None,
        help="the ditrun binary for `ditrun inspect` (default: $DITRUN_BIN)",
    )
    parser.add_argument("--kubernetes-version", default=KUBERNETES_VERSION)
    args = parser.parse_args()

    report = Report()
    definitions = core_definitions(args.kubernetes_version)
    files = yaml_files(args.paths)
    if not files:
        die(f"no YAML files in {' '.join(args.paths)}")
    docs = []
    for file in files:
        docs += load_docs(file, report)

    for doc in docs:
        if doc.file.name in KUSTOMIZATION_NAMES or doc.kind == "Kustomization":
            ok = validate_kustomization(doc, report)
        elif not isinstance(doc.obj.get("metadata"), dict) or not doc.obj["metadata"].get("name"):
            report.fail(doc.file, doc.label(), "at metadata.name: every object needs a name")
            ok = False
        elif (doc.obj.get("apiVersion"), doc.kind) in CUSTOM_SCHEMAS:
            schema = CUSTOM_SCHEMAS[(doc.obj.get("apiVersion"), doc.kind)]
            ok = validate_custom(doc, schema, definitions, report)
        elif "kind" not in doc.obj or "apiVersion" not in doc.obj:
            report.fail(doc.file, doc.label(), "want apiVersion and kind")
            ok = False
        else:
            ok = validate_core(doc, args.kubernetes_version, report)
        if ok:
            if doc.kind == "Kustomization":
                against = "its resources exist"
            elif (doc.obj.get("apiVersion"), doc.kind) in CUSTOM_SCHEMAS:
                against = (
                    f"k8s/schemas/{CUSTOM_SCHEMAS[(doc.obj.get('apiVersion'), doc.kind)]}, "
                    f"pods: Kubernetes {args.kubernetes_version} strict"
                )
            else:
                against = f"Kubernetes {args.kubernetes_version} strict"
            report.ok(doc.file, doc.label(), f"valid ({against})")

    resources = [d for d in docs if d.kind != "Kustomization"]
    check_references(resources, report)
    check_selectors(resources, report)
    used = check_job_mounts(resources, report)
    jobs = check_job_configmaps(resources, args.ditrun, report)
    check_sizes(resources, used, jobs, report)
    check_grace(resources, used, jobs, report)
    check_tensorboard(resources, jobs, report)

    if report.failures:
        print(f"validate-k8s: {report.failures} problem(s) in {len(files)} file(s)")
        return 1
    print(
        f"validate-k8s: {len(docs)} document(s) in {len(files)} file(s) valid (Kubernetes "
        f"{args.kubernetes_version}, kubernetes-validate {kubernetes_validate.__version__})"
        + (f"; {report.skipped} check(s) skipped" if report.skipped else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
