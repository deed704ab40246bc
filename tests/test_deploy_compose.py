"""deploy/compose.yaml: three nodes that find each other by service name.

No Docker engine runs here: Debian's docker-compose (1.29, apt in .ci/run)
validates the file offline (``config -q``), and PyYAML reads it for what the
cluster needs to form: every node in the actors list, each advertising
itself, the secret wired, one volume each.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import yaml
from nodes import REPO_ROOT
from test_deploy_docker import of

from counterdb.tap import Options, env_variable

COMPOSE = REPO_ROOT / "deploy" / "compose.yaml"
NODES = ["node1", "node2", "node3"]


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the << merges, as compose does


def image_env() -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in " ".join(of("ENV")).split())


def test_docker_compose_accepts_the_file() -> None:
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_three_nodes_each_advertise_their_service_name_in_one_actors_list() -> None:
    services = compose()["services"]
    assert sorted(services) == NODES
    port = image_env()["COUNTERDB_PORT"]
    real = {env_variable(name) for name in Options().synonyms.values()}
    for name, service in services.items():
        env = service["environment"]
        assert set(env) <= real, f"{name}: {set(env) - real} names no option"
        assert env["COUNTERDB_ADVERTISE"] == f"{name}:{port}"
        assert env["COUNTERDB_ACTORS"].split(",") == [f"{node}:{port}" for node in NODES]
        assert service["restart"] == "unless-stopped"


def test_every_node_reads_the_one_shared_secret() -> None:
    spec = compose()
    assert spec["secrets"]["cluster_secret"]["file"] == "./cluster-secret"
    for name, service in spec["services"].items():
        assert service["secrets"] == ["cluster_secret"], name
        # compose mounts a secret at /run/secrets/<name>.
        assert service["environment"]["COUNTERDB_CLUSTER_SECRET_FILE"] == "/run/secrets/cluster_secret", name
    # The secret itself stays out of git.
    assert "deploy/cluster-secret" in (REPO_ROOT / ".gitignore").read_text().split()


def test_every_node_keeps_its_data_on_its_own_volume() -> None:
    spec = compose()
    data_dir = image_env()["COUNTERDB_DATA_DIR"]
    mounts = {name: service["volumes"] for name, service in spec["services"].items()}
    assert all(len(m) == 1 and m[0].endswith(":" + data_dir) for m in mounts.values()), mounts
    volumes = [m[0].split(":")[0] for m in mounts.values()]
    assert len(set(volumes)) == 3 and set(volumes) == set(spec["volumes"])


def test_healthchecks_are_the_images_own() -> None:
    dockerfile = json.loads(of("HEALTHCHECK")[-1].split("CMD", 1)[1])
    for name, service in compose()["services"].items():
        assert service["healthcheck"]["test"] == ["CMD", *dockerfile], name
