"""The deployment files as data, for tests/test_deploy_manifests.py: the Kubernetes kustomizations rendered (the
subset of kustomize they use: ``resources`` and JSON 6902 ``patches``; any other field fails loudly rather than
being rendered wrong) and the Dockerfile's instructions."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
_KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "patches"}


def load_docs(path: Path) -> list[dict]:
    """The YAML documents of a manifest file (empty ones dropped)."""
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def _matches(doc: dict, target: dict) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    have = {"group": group, "version": version, "kind": doc["kind"], "name": doc["metadata"]["name"]}
    return all(have[k] == v for k, v in target.items())


def _apply_patch(kdir: Path, docs: list[dict], patch: dict) -> None:
    import jsonpatch

    assert set(patch) == {"path", "target"}, f"{kdir}: a patch the renderer does not know: {patch}"
    path = (kdir / patch["path"]).resolve()
    assert path.is_relative_to(kdir.resolve()), f"{path}: kustomize loads patches only from its own folder"
    matched = [i for i, d in enumerate(docs) if _matches(d, patch["target"])]
    assert len(matched) == 1, f"{kdir}: patch target {patch['target']} matches {len(matched)} resources"
    docs[matched[0]] = jsonpatch.apply_patch(docs[matched[0]], yaml.safe_load(path.read_text(encoding="utf-8")))


def render(kdir: Path) -> list[dict]:
    """What ``kubectl kustomize kdir`` prints, as a list of resources."""
    k = yaml.safe_load((kdir / "kustomization.yaml").read_text(encoding="utf-8"))
    unknown = set(k) - _KUSTOMIZE_FIELDS
    assert not unknown, f"{kdir}/kustomization.yaml: fields the test's renderer does not know: {sorted(unknown)}"
    assert k["kind"] == "Kustomization", k
    docs: list[dict] = []
    for res in k.get("resources", []):
        p = kdir / res
        docs += render(p) if p.is_dir() else load_docs(p)
    for patch in k.get("patches", []):
        _apply_patch(kdir, docs, patch)
    return docs


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} resources"
    return found[0]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form instruction (ENTRYPOINT, CMD, HEALTHCHECK's CMD)."""
    return json.loads(args)
