"""deploy/kubernetes: valid for Kubernetes 1.31 (kubernetes-validate ships
the schemas, strict: unknown fields fail), and wired so the cluster forms:
one actors entry per replica at its stable DNS name, each pod advertising its
own, probes on the node's port, the secret reaching the node as a file it
accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from nodes import REPO_ROOT
from test_deploy_docker import of

from counterdb.auth import SecretFileError, load_secrets
from counterdb.tap import Options, env_variable

KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"
VERSION = "1.31.0"


def documents(name: str = "counterdb.yaml") -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((KUBERNETES / name).read_text()))


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in documents() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in counterdb.yaml"
    return found[0]


def pod() -> dict[str, Any]:
    return one("StatefulSet")["spec"]["template"]["spec"]


def node() -> dict[str, Any]:
    (container,) = pod()["containers"]
    return container


def env() -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in node()["env"]}


@pytest.mark.parametrize("name", ["counterdb.yaml", "secret.yaml"])
def test_manifests_are_valid_kubernetes(name: str) -> None:
    for document in documents(name):
        kubernetes_validate.validate(document, VERSION, strict=True)


def test_actors_list_names_every_replica_at_its_stable_dns_name() -> None:
    statefulset = one("StatefulSet")
    service = one("Service", statefulset["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"  # headless: one DNS name per pod
    assert service["spec"]["publishNotReadyAddresses"] is True  # peers reach a starting node
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    port = env()["COUNTERDB_PORT"]
    pods = [f"{statefulset['metadata']['name']}-{i}" for i in range(statefulset["spec"]["replicas"])]
    assert env()["COUNTERDB_ACTORS"].split(",") == [f"{p}.{service['metadata']['name']}:{port}" for p in pods]
    # Each pod's own entry: $(POD_NAME) expands to the pod's name, defined before it.
    assert env()["COUNTERDB_ADVERTISE"] == f"$(POD_NAME).{service['metadata']['name']}:{port}"
    assert env()["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    names = [e["name"] for e in node()["env"]]
    assert names.index("POD_NAME") < names.index("COUNTERDB_ADVERTISE")


def test_every_counterdb_variable_is_an_option_and_the_values_parse() -> None:
    real = {env_variable(name) for name in Options().synonyms.values()}
    counterdb = {k: v for k, v in env().items() if k.startswith("COUNTERDB_")}
    assert set(counterdb) <= real, set(counterdb) - real
    as_started = {**counterdb, "COUNTERDB_ADVERTISE": "counterdb-0.counterdb:8080"}
    as_started.pop("COUNTERDB_CLUSTER_SECRET_FILE")  # checked below, with a file
    Options(as_started).parseOptions([])


def test_probes_hit_health_and_ready_on_the_nodes_port() -> None:
    (port,) = node()["ports"]
    assert str(port["containerPort"]) == env()["COUNTERDB_PORT"]
    for probe, path in [("livenessProbe", "/health"), ("startupProbe", "/health"), ("readinessProbe", "/ready")]:
        assert node()[probe]["httpGet"] == {"path": path, "port": port["name"]}, probe


def test_each_pod_keeps_its_data_on_its_own_claim() -> None:
    (claim,) = one("StatefulSet")["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in node()["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == env()["COUNTERDB_DATA_DIR"]


def test_runs_as_the_images_non_root_user_on_a_read_only_root() -> None:
    security = pod()["securityContext"]
    assert security["runAsNonRoot"] is True
    assert f"{security['runAsUser']}:{security['runAsGroup']}" == of("USER")[-1]
    for container in pod()["initContainers"] + pod()["containers"]:
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, container["name"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, container["name"]
        assert container["resources"]["limits"]["memory"], container["name"]


def test_disruption_budget_lets_one_pod_go_at_a_time() -> None:
    budget = one("PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"] == one("StatefulSet")["spec"]["selector"]


def test_the_secret_reaches_the_node_as_a_file_it_accepts(tmp_path: Path) -> None:
    (secret,) = documents("secret.yaml")
    volume = next(v for v in pod()["volumes"] if "secret" in v)
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    (key,) = secret["stringData"]
    # The init container copies it, mode 600, to the file the node reads.
    (init,) = pod()["initContainers"]
    mount = next(m["mountPath"] for m in init["volumeMounts"] if m["name"] == volume["name"])
    assert init["command"] == ["install", "-m", "600", f"{mount}/{key}", env()["COUNTERDB_CLUSTER_SECRET_FILE"]]
    # The example's placeholder is refused: a cluster never runs on a secret from git.
    placeholder = tmp_path / key
    placeholder.write_text(secret["stringData"][key])
    placeholder.chmod(0o600)
    with pytest.raises(SecretFileError, match="without spaces"):
        load_secrets(str(placeholder))
