"""deploy/kubernetes (validated against the Kubernetes JSON schemas by kubernetes-validate, offline) and
deploy/docker/Dockerfile (parsed: Docker cannot run here), held to what they must say and to each other: the torch
pin of pyproject.toml, the flags of `safedl serve --help`, one port, secrets only by reference."""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from _manifests import DOCKERFILE, K8S, ROOT, dockerfile, exec_form, load_docs, one, render
from _serve_flags import defaults, flags_in, help_flags

VARIANTS = ("base", "gpu")
SCHEMA_VERSIONS = ("1.25.0", "latest")  # the oldest schemas kubernetes-validate ships, and its newest


def _validator():
    try:
        import kubernetes_validate
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("kubernetes-validate is not installed but CI is set: it is in the dev extra")
        pytest.skip("needs kubernetes-validate (pip install -e '.[dev]'); CI=1 makes this a failure")
    return kubernetes_validate


def _validate(doc: dict, version: str) -> None:
    kv = _validator()
    kv.validate(doc, kv.utils.latest_version() if version == "latest" else version, strict=True)


def _container(docs: list[dict]) -> dict:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def _pod(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("variant", (*VARIANTS, "secret.example.yaml"))
def test_manifests_validate_against_the_kubernetes_schemas(variant, version):
    docs = load_docs(K8S / variant) if variant.endswith(".yaml") else render(K8S / variant)
    assert docs
    for doc in docs:
        _validate(doc, version)


_BREAKS = {
    "replicas as text": lambda d: d["spec"].update(replicas="two"),
    "a misspelt field": lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    .update(paht="/v1/ready"),
    "a container without a name": lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"),
}


@pytest.mark.parametrize("brk", sorted(_BREAKS))
def test_the_validator_rejects_a_broken_copy(brk, tmp_path):
    kv = _validator()
    (doc,) = load_docs(K8S / "base" / "deployment.yaml")
    _BREAKS[brk](doc)
    (tmp_path / "deployment.yaml").write_text(yaml.safe_dump(doc))
    (broken,) = load_docs(tmp_path / "deployment.yaml")
    with pytest.raises(kv.utils.ValidationError):
        _validate(broken, "latest")


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_deployment_has_replicas_probes_resources_and_a_locked_down_container(variant):
    docs = render(K8S / variant)
    dep, c, pod = one(docs, "Deployment"), _container(docs), _pod(docs)
    assert dep["spec"]["replicas"] >= 2
    assert c["readinessProbe"]["httpGet"]["path"] == "/v1/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v1/health"
    assert {"cpu", "memory"} <= set(c["resources"]["requests"]) and {"cpu", "memory"} <= set(c["resources"]["limits"])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    graceful = float(_arg(c["args"], "--graceful-s"))
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > graceful + pre_stop  # SIGKILL only after the drain


def test_only_the_gpu_variant_asks_for_a_gpu_and_cuda():
    base, gpu = render(K8S / "base"), render(K8S / "gpu")
    assert _container(gpu)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _arg(_container(gpu)["args"], "--device") == "cuda"
    assert "nvidia.com/gpu" not in _container(base)["resources"]["limits"]
    assert "--device" not in _container(base)["args"]  # the default: cpu
    assert _container(gpu)["image"] != _container(base)["image"]
    assert [d for d in gpu if d["kind"] != "Deployment"] == [d for d in base if d["kind"] != "Deployment"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_secrets_reach_the_pod_only_by_reference(variant):
    """No clear-text value in the environment; the database locations come from the Secret through $(VAR) args
    (Kubernetes leaves an undefined $(VAR) as literal text, so each must be defined); the signing key is a file of
    the Secret volume. The example Secret has every key the pod reads."""
    docs = render(K8S / variant)
    c, pod = _container(docs), _pod(docs)
    (secret,) = load_docs(K8S / "secret.example.yaml")
    env = {e["name"]: e for e in c["env"]}
    assert all("value" not in e and "secretKeyRef" in e["valueFrom"] for e in env.values()), env
    used = set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(c["args"])))
    assert used and used <= set(env), (used, set(env))
    assert _arg(c["args"], "--keys") == "$(SAFEDL_KEYS_DB)" and _arg(c["args"], "--audit") == "$(SAFEDL_AUDIT_DB)"
    refs = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"]) for e in env.values()}
    vol = next(v for v in pod["volumes"] if "secret" in v)
    mount = next(m for m in c["volumeMounts"] if m["name"] == vol["name"])
    key_file = Path(_arg(c["args"], "--signing-key-file"))
    assert mount["readOnly"] is True and key_file.parent == Path(mount["mountPath"])
    assert key_file.name in {i["path"] for i in vol["secret"]["items"]}
    refs |= {(vol["secret"]["secretName"], i["key"]) for i in vol["secret"]["items"]}
    assert refs <= {(secret["metadata"]["name"], k) for k in secret["stringData"]}, refs


def test_the_example_secret_s_placeholder_key_is_refused_at_start(tmp_path):
    from safedl.errors import UserError
    from safedl.utils.keyfile import read_signing_key

    (secret,) = load_docs(K8S / "secret.example.yaml")
    (tmp_path / "signing.key").write_text(secret["stringData"]["signing.key"])
    with pytest.raises(UserError, match="at least"):
        read_signing_key(tmp_path / "signing.key")


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_bundle_comes_from_a_read_only_volume(variant):
    docs = render(K8S / variant)
    c, pod = _container(docs), _pod(docs)
    bundle = Path(c["args"][0])
    mount = next(m for m in c["volumeMounts"] if bundle.is_relative_to(m["mountPath"]))
    vol = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] is True and vol["persistentVolumeClaim"]["readOnly"] is True
    writable = [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")]
    db = Path(one(load_docs(K8S / "secret.example.yaml"), "Secret")["stringData"]["keys-db"])
    assert any(db.is_relative_to(w) for w in writable)  # SQLite needs a writable folder on a read-only root


def test_every_flag_in_the_manifests_and_the_dockerfile_is_a_serve_flag():
    flags = help_flags()
    assert "--no-such-flag" not in flags and "--device" in flags
    used = {f: "Dockerfile CMD" for f in flags_in(exec_form(dict(dockerfile())["CMD"]))}
    for variant in VARIANTS:
        used |= {f: f"kubernetes/{variant}" for f in flags_in(_container(render(K8S / variant))["args"])}
    assert {"--keys", "--audit", "--port", "--host"} <= set(used)
    unknown = {f: where for f, where in used.items() if f not in flags}
    assert not unknown, f"flags that `safedl serve --help` does not list: {unknown}"


def test_the_service_the_budget_and_the_autoscaler_select_the_deployment():
    docs = render(K8S / "base")
    dep = one(docs, "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc, pdb, hpa = one(docs, "Service"), one(docs, "PodDisruptionBudget"), one(docs, "HorizontalPodAutoscaler")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < dep["spec"]["replicas"]  # a drain can proceed
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    port_names = {p["name"] for p in _container(docs)["ports"]}
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port_names


def test_dockerfile_installs_pyproject_s_torch_from_the_cpu_index_before_safedl():
    pins = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
            if d.startswith("torch")]
    assert len(pins) == 1 and "==" in pins[0], pins
    steps = dockerfile()
    assert steps[0] == ("FROM", "python:3.11-slim") and [s for s, _ in steps].count("FROM") == 1
    runs = [a for s, a in steps if s == "RUN"]
    torch_at = next(i for i, a in enumerate(runs) if re.search(r"\btorch==", a))
    safedl_at = next(i for i, a in enumerate(runs) if "[serve]" in a)
    assert re.search(r"\btorch==(\S+)", runs[torch_at]).group(1) == pins[0].split("==")[1]
    assert torch_at < safedl_at  # else pip would take torch (with CUDA) from PyPI for safedl
    arg = dict(a.split("=", 1) for s, a in steps if s == "ARG" and "=" in a)
    assert "${TORCH_INDEX_URL}" in runs[torch_at] and arg["TORCH_INDEX_URL"].endswith("/whl/cpu")


def test_dockerfile_runs_safedl_serve_as_the_manifests_non_root_user():
    steps = dict(dockerfile())
    user = steps["USER"].split(":")[0]
    assert user not in ("root", "0") and int(user) == _pod(render(K8S / "base"))["securityContext"]["runAsUser"]
    assert exec_form(steps["ENTRYPOINT"]) == ["safedl", "serve"]
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["safedl"] == "safedl.cli:app"


def test_one_port_across_the_dockerfile_the_healthcheck_and_kubernetes():
    steps = dict(dockerfile())
    (exposed,) = [int(p.split("/")[0]) for p in steps["EXPOSE"].split()]
    health = " ".join(exec_form(steps["HEALTHCHECK"].split("CMD", 1)[1].strip()))
    m = re.search(r"http://127\.0\.0\.1:(\d+)(/v1/health)\b", health)
    assert m and int(m.group(1)) == exposed
    assert int(_arg(exec_form(steps["CMD"]), "--port")) == exposed
    for variant in VARIANTS:
        c = _container(render(K8S / variant))
        (port,) = c["ports"]
        assert port["containerPort"] == exposed == int(_arg(c["args"], "--port"))
        assert {c[p]["httpGet"]["port"] for p in ("readinessProbe", "livenessProbe", "startupProbe")} == {port["name"]}
    assert defaults()["--port"] == exposed  # the service's own default too


def test_dockerfile_copies_only_what_the_repository_has():
    sources = [p for s, a in dockerfile() if s == "COPY" for p in a.split()[:-1] if not p.startswith("--")]
    assert sources and all((ROOT / p).exists() for p in sources), sources
    assert DOCKERFILE.parent.joinpath("README.md").read_text().count("--device cuda") >= 1
