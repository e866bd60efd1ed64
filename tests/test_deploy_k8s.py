"""Kubernetes manifests in deploy/k8s, offline and schema-level.

Objects validate against the Kubernetes 1.32 OpenAPI schemas (kubernetes-validate, strict: a
misspelt field fails instead of being dropped by the API server) and against the shapes of the
dask-kubernetes CRDs; our kustomize reading matches kubectl's; images are the ones deploy/docker builds.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from deploy_support import (
    DASK_GROUP,
    DASK_KINDS,
    IMAGE_REPO,
    IMAGES,
    K8S,
    K8S_VERSION,
    RENDERED,
    STANDALONE,
    _rel,
    all_containers,
    all_k8s_objects,
    find,
    load_docs,
)


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=_rel)
def test_k8s_documents_have_identity(path):
    for doc in load_docs(path):
        assert doc.get("apiVersion") and doc.get("kind"), f"{_rel(path)}: document without apiVersion/kind"
        if doc["kind"] == "Kustomization":
            continue
        assert doc.get("metadata", {}).get("name"), f"{_rel(path)}: {doc['kind']} without metadata.name"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), doc["metadata"]["name"]


def _builtin_objects() -> list[tuple[str, dict]]:
    return [(w, o) for w, o in all_k8s_objects() if not o["apiVersion"].startswith(DASK_GROUP)]


@pytest.mark.parametrize("where,obj", _builtin_objects(),
                         ids=lambda x: x if isinstance(x, str) else f"{x['kind']}/{x['metadata']['name']}")
def test_builtin_objects_match_kubernetes_schema(where, obj):
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{where}: {obj['kind']}/{obj['metadata']['name']} at {path}: {exc.message}")


# The dask-kubernetes CRDs (operator 2026.3, customresources/templates.yaml), with the pod and
# service specs of Kubernetes itself. additionalProperties: false marks fields the API server
# would silently prune.
_DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/"
_META = {"type": "object", "additionalProperties": False, "properties": {
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
_WORKER = {"type": "object", "required": ["spec"], "additionalProperties": False, "properties": {
    "replicas": {"type": "integer", "minimum": 0}, "metadata": _META,
    "spec": {"$ref": _DEFS + "io.k8s.api.core.v1.PodSpec"}}}
_SCHEDULER = {"type": "object", "required": ["spec", "service"], "additionalProperties": False, "properties": {
    "metadata": _META, "spec": {"$ref": _DEFS + "io.k8s.api.core.v1.PodSpec"},
    "service": {"$ref": _DEFS + "io.k8s.api.core.v1.ServiceSpec"}}}
_CLUSTER_SPEC = {"type": "object", "required": ["scheduler", "worker"], "additionalProperties": False,
                 "properties": {"idleTimeout": {"type": "integer"}, "scheduler": _SCHEDULER, "worker": _WORKER}}


def _custom_resource(kind: str, spec: dict) -> dict:
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {"apiVersion": {"const": f"{DASK_GROUP}/v1"}, "kind": {"const": kind},
                           "metadata": {"$ref": _DEFS + "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"},
                           "spec": spec}}


DASK_SCHEMAS = {
    "DaskCluster": _custom_resource("DaskCluster", _CLUSTER_SPEC),
    "DaskWorkerGroup": _custom_resource("DaskWorkerGroup", {
        "type": "object", "required": ["cluster", "worker"], "additionalProperties": False,
        "properties": {"cluster": {"type": "string"}, "worker": _WORKER}}),
    "DaskJob": _custom_resource("DaskJob", {
        "type": "object", "required": ["cluster", "job"], "additionalProperties": False, "properties": {
            "job": {"type": "object", "required": ["spec"], "additionalProperties": False,
                    "properties": {"metadata": _META, "spec": {"$ref": _DEFS + "io.k8s.api.core.v1.PodSpec"}}},
            "cluster": {"type": "object", "required": ["spec"], "additionalProperties": False,
                        "properties": {"metadata": _META, "spec": _CLUSTER_SPEC}}}}),
}


def dask_validator(kind: str) -> jsonschema.protocols.Validator:
    import importlib_resources

    folder = importlib_resources.files("kubernetes_validate") / "kubernetes-json-schema"
    strict = folder / f"v{K8S_VERSION}.0-local-strict" / "_definitions.json"
    definitions = referencing.Resource.from_contents(json.loads(strict.read_text("utf-8")))
    registry = definitions @ referencing.Registry()
    return jsonschema.Draft202012Validator(DASK_SCHEMAS[kind], registry=registry)


def _dask_objects() -> list[tuple[str, dict]]:
    return [(w, o) for w, o in all_k8s_objects() if o["apiVersion"].startswith(DASK_GROUP)]


@pytest.mark.parametrize("where,obj", _dask_objects(),
                         ids=lambda x: x if isinstance(x, str) else f"{x['kind']}/{x['metadata']['name']}")
def test_dask_resources_match_crd_schema(where, obj):
    assert obj["kind"] in DASK_KINDS and obj["apiVersion"] == f"{DASK_GROUP}/v1", obj["kind"]
    errors = sorted(dask_validator(obj["kind"]).iter_errors(obj), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{where} at {'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_schema_checks_catch_mistakes():
    """The validators used above do reject what the API server would reject or silently drop."""
    job = copy.deepcopy(find(STANDALONE["daskjob.yaml"], "DaskJob"))
    job["spec"]["cluster"]["spec"]["worker"]["spec"]["containers"][0]["comand"] = ["dask"]
    assert list(dask_validator("DaskJob").iter_errors(job))
    del job["spec"]["cluster"]["spec"]["worker"]["spec"]["containers"][0]["comand"]
    del job["spec"]["cluster"]["spec"]["scheduler"]["service"]
    assert list(dask_validator("DaskJob").iter_errors(job))
    cron = copy.deepcopy(find(RENDERED, "CronJob"))
    cron["spec"]["concurrencyPolicy"] = 5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, K8S_VERSION, strict=True)
    cron = copy.deepcopy(find(RENDERED, "CronJob"))
    cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"] = [8]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cron, K8S_VERSION, strict=True)


def test_kustomize_matches_kubectl():
    """Our reading of deploy/k8s/kustomization.yaml equals what kubectl renders (when installed)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize rendering is checked in Python only")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]

    def key(o: dict) -> tuple:
        return (o["kind"], o["metadata"]["name"], o["metadata"].get("namespace"))

    assert sorted(map(key, rendered)) == sorted(map(key, RENDERED))
    ours = {key(o): o for o in RENDERED}
    for obj in rendered:
        assert obj == ours[key(obj)], f"{key(obj)} differs between kubectl kustomize and the test's reading"


def test_images_are_built_here():
    """Every clc-dask image a manifest names is one of deploy/docker's, at the package version."""
    for where, _, container in all_containers():
        image = container["image"]
        if image.startswith(IMAGE_REPO):
            assert image in IMAGES, f"{where}: {image} is not built by deploy/docker (tags: {sorted(IMAGES)})"
        else:
            assert ":" in image and not image.endswith(":latest"), f"{where}: pin a tag for {image}"
