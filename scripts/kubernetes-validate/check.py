"""Validates `kiln export kubernetes` output for real, offline.

Usage: check.py --kubernetes-version 1.29.0 [--argo-models DIR] --json OBJECTS.json MANIFESTS.yaml

- The YAML is parsed by PyYAML (a YAML 1.1 reader, the stricter about `on`, `yes`, `0755`)
  and must equal, value for value and type for type, the objects kiln printed as JSON: the
  emitter round-trips.
- Kubernetes objects are validated with kubernetes-validate (pinned in requirements.txt)
  against that Kubernetes version's schemas, strict: an unknown field is an error.
- An Argo Rollouts Rollout: its pod template, inside a Deployment of the same metadata,
  replicas and selector, is validated as above; an AnalysisTemplate's Job metrics as the Jobs
  they make; the whole objects by argo-check.mjs against Argo Rollouts' published API (when
  --argo-models is given; else this is an error).
- Any other kind is an error: nothing passes for want of a schema.
Exit 0 when everything passed, 1 otherwise.
"""
import argparse
import json
import os
import subprocess
import sys

import kubernetes_validate
import yaml


def same(a, b, path, errors):
    """Deep equality that also tells 1 from 1.0 from True and "1" from 1."""
    if type(a) is not type(b):
        errors.append(f"{path}: YAML read {a!r} ({type(a).__name__}), JSON has {b!r} ({type(b).__name__})")
    elif isinstance(a, dict):
        if a.keys() != b.keys():
            errors.append(f"{path}: keys differ: {sorted(a.keys() ^ b.keys())}")
        for k in a.keys() & b.keys():
            same(a[k], b[k], f"{path}.{k}", errors)
    elif isinstance(a, list):
        if len(a) != len(b):
            errors.append(f"{path}: {len(a)} items in YAML, {len(b)} in JSON")
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]", errors)
    elif a != b:
        errors.append(f"{path}: YAML read {a!r}, JSON has {b!r}")


def kube(obj, version):
    try:
        v = kubernetes_validate.validate(obj, version, strict=True)
        return None, v
    except kubernetes_validate.ValidationError as e:
        return ".".join(str(p) for p in e.path) + ": " + e.message, None
    except kubernetes_validate.SchemaNotFoundError as e:
        return str(e.message), None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kubernetes-version", required=True)
    p.add_argument("--argo-models")
    p.add_argument("--json", required=True)
    p.add_argument("yaml")
    a = p.parse_args()
    with open(a.yaml) as f:
        text = f.read()
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    with open(a.json) as f:
        objects = json.load(f)["objects"]
    failed = 0
    errors = []
    same(docs, objects, "", errors)
    for e in errors:
        print(f"ERROR round trip {e}")
        failed += 1
    argo = []
    for obj in docs:
        what = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj.get("kind") == "AnalysisTemplate" and obj.get("apiVersion") == "argoproj.io/v1alpha1":
            argo.append(obj)
            # Each Job metric's Job, as the Job Argo creates from it.
            for metric in obj.get("spec", {}).get("metrics", []):
                job = metric.get("provider", {}).get("job")
                if job is None:
                    continue
                wrapper = {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "metadata": {"name": f"{obj['metadata']['name']}-{metric['name']}"},
                    "spec": job.get("spec"),
                }
                err, v = kube(wrapper, a.kubernetes_version)
                label = f"{what} job {metric['name']}"
                if err:
                    print(f"ERROR {label}: {err}")
                    failed += 1
                else:
                    print(f"ok {label} (Kubernetes {v}, strict)")
            continue
        if obj.get("apiVersion") == "argoproj.io/v1alpha1":
            argo.append(obj)
            spec = obj.get("spec", {})
            wrapper = {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": obj.get("metadata"),
                "spec": {k: spec[k] for k in ("replicas", "selector", "template", "progressDeadlineSeconds") if k in spec},
            }
            err, v = kube(wrapper, a.kubernetes_version)
            label = f"{what} pod template"
        else:
            err, v = kube(obj, a.kubernetes_version)
            label = what
        if err:
            print(f"ERROR {label}: {err}")
            failed += 1
        else:
            print(f"ok {label} (Kubernetes {v}, strict)")
    if argo:
        if not a.argo_models:
            print("ERROR Argo Rollouts objects and no --argo-models to check them against")
            failed += 1
        else:
            here = os.path.dirname(os.path.abspath(__file__))
            r = subprocess.run(
                ["node", os.path.join(here, "argo-check.mjs"), a.argo_models],
                input=json.dumps(argo), text=True,
            )
            failed += r.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
