"""The KubeRay manifests against KubeRay's CRD schemas (unknown fields are errors, as with
kubectl's strict validation), and the RayJob's overrides against conf/."""

import copy
import functools
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.test_config import job

ROOT = Path(__file__).resolve().parents[2]
CRDS = Path(__file__).resolve().parent / "crds"  # KubeRay's ray.io/v1 CRDs, as published


@functools.cache
def _crd(crd_file: str) -> dict:
    # libyaml's loader where PyYAML has it: the CRDs are 1-2 MB, seconds for the pure-Python one.
    return yaml.load((CRDS / crd_file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def strict_schema(crd_file: str) -> dict:
    crd = _crd(crd_file)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def close(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
                if not node.get("x-kubernetes-preserve-unknown-fields"):
                    node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


def manifest(name: str) -> dict:
    return yaml.safe_load((ROOT / "k8s" / name).read_text())


@pytest.mark.parametrize("name,crd", [("raycluster.yaml", "ray.io_rayclusters.yaml"), ("rayjob.yaml", "ray.io_rayjobs.yaml")])
def test_manifest_matches_kuberay_schema(name, crd):
    doc = manifest(name)
    assert doc["apiVersion"] == "ray.io/v1"
    jsonschema.validate(doc, strict_schema(crd))


def test_strict_schema_rejects_unknown_fields():
    doc = manifest("rayjob.yaml")
    doc["spec"]["shutdownAfterJobFinish"] = True  # a typo kubectl --validate=strict rejects
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        jsonschema.validate(doc, strict_schema("ray.io_rayjobs.yaml"))


def test_gpu_workers_and_shared_volume():
    spec = manifest("raycluster.yaml")["spec"]
    (group,) = spec["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    for pod in (spec["headGroupSpec"], group):
        mounts = {m["mountPath"] for m in pod["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert "/shared" in mounts
    pvc = manifest("pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_rayjob_entrypoint_overrides_compose_and_validate():
    spec = manifest("rayjob.yaml")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"]
    cfg = job(*argv[2:])
    from moe_cluster.config import validate

    validate(cfg)
    gpus = sum(
        g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert cfg.cluster.use_gpu and cfg.cluster.num_workers <= gpus
    assert cfg.trainer.checkpoint_dir.startswith("/shared/") and cfg.resume
