"""Render a kustomization (deploy/kubernetes/base or an overlay) to Kubernetes objects, offline.

    python deploy/kubernetes/render.py deploy/kubernetes/overlays/prod > prod.yaml

Why: `kubectl apply -k` is how a cluster gets these manifests, but no kustomize/kubectl is part of
Flywheel's dependencies, and the tests validate every rendered object offline. This renders exactly
the subset of kustomize the manifests use, and refuses anything else (an unknown key in a
kustomization.yaml is an error, never silently ignored), so the two cannot drift apart unnoticed:

- `resources`: YAML files, or directories holding a kustomization.yaml (rendered recursively);
- `namespace`: set on every namespaced object, and on RoleBinding subjects of kind ServiceAccount;
- `images`: `name` → `newName` / `newTag` on containers and init containers;
- `patches` with `path` only: strategic-merge patches naming their target by apiVersion, kind and
  metadata.name; maps merge recursively, the lists Kubernetes merges by key (containers, env,
  volumes, volumeMounts, ports, ...) merge by that key, other lists are replaced;
- `configMapGenerator` with `files` (`key=path` or `path`) and `generatorOptions:
  disableNameSuffixHash: true` (the manifests name their ConfigMaps; no hash suffix).

Needs only PyYAML.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

KNOWN_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "patches", "configMapGenerator",
              "generatorOptions"}
# Kubernetes' patchMergeKey for the lists these manifests patch.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort", "imagePullSecrets": "name"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass"}


class RenderError(ValueError):
    """A kustomization uses something this renderer does not support, or is wrong."""


def render(path: str | Path) -> list[dict]:
    """The objects a kustomization directory renders to, in resource order."""
    root = Path(path)
    kfile = root / "kustomization.yaml"
    if not kfile.is_file():
        raise RenderError(f"{root} has no kustomization.yaml")
    spec = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(spec) - KNOWN_KEYS
    if unknown:
        raise RenderError(f"{kfile}: unsupported kustomize keys {sorted(unknown)} (render.py's subset: "
                          f"{sorted(KNOWN_KEYS)})")
    objects: list[dict] = []
    for entry in spec.get("resources", []):
        target = root / entry
        if target.is_dir():
            objects += render(target)
        elif target.is_file():
            objects += [d for d in yaml.safe_load_all(target.read_text()) if d]
        else:
            raise RenderError(f"{kfile}: resource {entry} does not exist")
    objects += _generate_config_maps(root, spec)
    for patch in spec.get("patches", []):
        if set(patch) != {"path"}:
            raise RenderError(f"{kfile}: only `patches: - path: FILE` is supported, not {sorted(patch)}")
        for doc in yaml.safe_load_all((root / patch["path"]).read_text()):
            if doc:
                _apply_patch(objects, doc, kfile)
    for image in spec.get("images", []):
        _set_image(objects, image)
    if "namespace" in spec:
        for obj in objects:
            _set_namespace(obj, spec["namespace"])
    return objects


def _generate_config_maps(root: Path, spec: dict) -> list[dict]:
    gens = spec.get("configMapGenerator", [])
    if gens and not (spec.get("generatorOptions") or {}).get("disableNameSuffixHash"):
        raise RenderError(f"{root}: configMapGenerator needs generatorOptions.disableNameSuffixHash: true")
    out = []
    for gen in gens:
        if set(gen) - {"name", "files"}:
            raise RenderError(f"{root}: configMapGenerator {gen.get('name')}: only name and files are supported")
        data = {}
        for item in gen.get("files", []):
            key, _, file = item.partition("=") if "=" in item else (Path(item).name, "", item)
            data[key] = (root / file).read_text()
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    return out


def _apply_patch(objects: list[dict], patch: dict, where: Path) -> None:
    key = (patch.get("apiVersion"), patch.get("kind"), patch.get("metadata", {}).get("name"))
    matches = [o for o in objects if (o.get("apiVersion"), o.get("kind"), o["metadata"]["name"]) == key]
    if len(matches) != 1:
        raise RenderError(f"{where}: patch target {key} matches {len(matches)} objects, not 1")
    merged = strategic_merge(matches[0], patch)
    matches[0].clear()
    matches[0].update(merged)


def strategic_merge(base, patch, field: str | None = None):
    """`patch` merged into a copy of `base` (the subset of strategic merge described in the module doc)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            out[k] = strategic_merge(out[k], v, k) if k in out else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        mkey = MERGE_KEYS[field]
        out = copy.deepcopy(base)
        for item in patch:
            hit = next((i for i, b in enumerate(out) if b.get(mkey) == item.get(mkey)), None)
            if hit is None:
                out.append(copy.deepcopy(item))
            else:
                out[hit] = strategic_merge(out[hit], item)
        return out
    return copy.deepcopy(patch)


def _set_image(objects: list[dict], image: dict) -> None:
    if set(image) - {"name", "newName", "newTag"}:
        raise RenderError(f"images: only name, newName, newTag are supported, not {sorted(image)}")
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            name, _, tag = c["image"].rpartition(":") if ":" in c["image"] else (c["image"], "", "")
            if name == image["name"]:
                c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}".rstrip(":")


def _set_namespace(obj: dict, namespace: str) -> None:
    if obj["kind"] not in CLUSTER_SCOPED:
        obj["metadata"]["namespace"] = namespace
    if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
        for subject in obj.get("subjects", []):
            if subject.get("kind") == "ServiceAccount":
                subject["namespace"] = namespace


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: render.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    yaml.safe_dump_all(render(argv[0]), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
