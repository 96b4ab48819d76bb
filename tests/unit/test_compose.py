"""Static checks of docker-compose.yml (Docker is not needed to run them).

They read the compose file and the files it points at, and fail on real breakage:
a service or module that does not exist, a wrong port, a dangling depends_on or mount.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from schemas.topics import SERVICES

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"

# service -> published HTTP port (dispatch has no public API; its port serves /metrics)
APP_PORTS = {
    "intake": 8101,
    "handling": 8102,
    "verification": 8103,
    "opscenter": 8104,
    "dispatch": 8105,
}
APP_SERVICES = sorted(APP_PORTS)
INFRA_SERVICES = ["kafka", "kafka-init", "postgres", "prometheus", "grafana"]
# service -> module run with `python -m`
MODULES = {name: f"services.{name}" for name in APP_SERVICES} | {"kafka-init": "services.admin"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    assert COMPOSE.is_file(), f"{COMPOSE} is missing"
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "no services: mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def env_of(service: dict[str, Any]) -> dict[str, str]:
    """`environment:` as a dict, whether written as a mapping or as a list of KEY=VALUE."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {pair[0]: (pair[1] if len(pair) > 1 else "") for pair in pairs}
    return {str(key): "" if value is None else str(value) for key, value in env.items()}


def command_of(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    assert command, "no command"
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """depends_on as {target: condition} (short list syntax means service_started)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def published_ports(service: dict[str, Any]) -> list[tuple[int, int]]:
    """(host port, container port) pairs from short ("[ip:]host:container[/proto]") or long syntax."""
    pairs = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            pairs.append((int(port["published"]), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        assert len(parts) >= 2, f"port {port!r} is not published on the host"
        pairs.append((int(parts[-2]), int(parts[-1])))
    return pairs


def bind_sources(service: dict[str, Any]) -> list[str]:
    """Host paths of bind mounts (named volumes are skipped)."""
    sources = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                sources.append(str(volume["source"]))
            continue
        source = str(volume).split(":")[0]
        if source.startswith((".", "/", "~")):
            sources.append(source)
    return sources


def test_expected_services_exist(services: dict[str, dict[str, Any]]) -> None:
    missing = [name for name in INFRA_SERVICES + APP_SERVICES if name not in services]
    assert not missing, f"services missing from docker-compose.yml: {missing}"


def test_kafka_is_single_node_kraft(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    assert re.fullmatch(r"apache/kafka:4\.\d+\.\d+", kafka["image"]), kafka["image"]
    env = env_of(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{node_id}@")
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    listeners = env["KAFKA_LISTENERS"]
    assert f"{controller}://" in listeners and "CLIENT://:9094" in listeners
    assert "CLIENT://kafka:9094" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert controller not in env["KAFKA_ADVERTISED_LISTENERS"]
    protocol_map = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    names = {item.split("://")[0] for item in listeners.split(",")}
    assert names <= set(protocol_map), f"listeners without a protocol: {names - set(protocol_map)}"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"].lower() == "false"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    # The image formats storage with CLUSTER_ID: a base64url 16-byte UUID is 22 characters.
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", env["CLUSTER_ID"]), env["CLUSTER_ID"]
    test = kafka["healthcheck"]["test"]
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in " ".join(test if isinstance(test, list) else [test])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_command_runs_an_existing_module(
    services: dict[str, dict[str, Any]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `python -m` in the image runs from the project directory (WORKDIR /app), which is on sys.path.
    monkeypatch.syspath_prepend(str(REPO))
    argv = command_of(services[name])
    assert argv[:2] == ["python", "-m"], f"{name}: command must be `python -m <module>`, got {argv}"
    module = argv[2]
    assert module == MODULES[name], f"{name}: runs {module}, expected {MODULES[name]}"
    try:
        spec = importlib.util.find_spec(module)
    except ModuleNotFoundError as exc:
        pytest.fail(f"{name}: module {module} cannot be found ({exc})")
    assert spec is not None, f"{name}: module {module} cannot be found"
    if spec.submodule_search_locations is not None:
        # A package runs with `python -m` only if it has a __main__ module.
        assert importlib.util.find_spec(f"{module}.__main__") is not None, f"{module} has no __main__.py"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_gridloop_services_use_the_built_image(services: dict[str, dict[str, Any]], name: str) -> None:
    service = services[name]
    build = service.get("build")
    assert build is not None, f"{name}: no build section"
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (REPO / context / dockerfile).is_file(), f"{name}: {context}/{dockerfile} does not exist"
    assert env_of(service)["GRIDLOOP_KAFKA_BOOTSTRAP"] == "kafka:9094"  # the SASL listener


def test_kafka_init_runs_once_after_kafka_is_healthy_and_applies_the_acls(services: dict[str, dict[str, Any]]) -> None:
    init = services["kafka-init"]
    assert str(init.get("restart")) == "no"
    assert command_of(init)[3:] == ["init", "--acls"]  # the catalog's topics, then each service's ACLs
    assert depends_on(init).get("kafka") == "service_healthy"
    assert env_of(init)["GRIDLOOP_KAFKA_SASL_USERNAME"] == "admin"  # a super user: it may grant


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_ports_and_wiring(services: dict[str, dict[str, Any]], name: str) -> None:
    service = services[name]
    port = APP_PORTS[name]
    env = env_of(service)
    assert env["GRIDLOOP_HTTP_PORT"] == str(port)
    assert env["GRIDLOOP_HTTP_HOST"] == "0.0.0.0"
    assert (port, port) in published_ports(service), f"{name}: port {port} not published as {port}:{port}"
    assert env["GRIDLOOP_DATABASE_URL"] == f"postgresql+psycopg://gridloop:gridloop@postgres:5432/{name}"
    deps = depends_on(service)
    assert deps.get("kafka-init") == "service_completed_successfully"  # topics made and ACLs granted
    assert deps.get("postgres") == "service_healthy"


def test_no_host_port_is_published_twice(services: dict[str, dict[str, Any]]) -> None:
    seen: dict[int, str] = {}
    for name, service in services.items():
        for host_port, _ in published_ports(service):
            assert host_port not in seen, f"host port {host_port} used by {seen[host_port]} and {name}"
            seen[host_port] = name


def test_depends_on_targets_exist_and_health_conditions_have_healthchecks(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, service in services.items():
        for target, condition in depends_on(service).items():
            assert target in services, f"{name} depends on unknown service {target}"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} healthy: no healthcheck"


def test_bind_mounted_host_paths_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for source in bind_sources(service):
            assert not source.startswith(("/", "~")), f"{name}: absolute host path {source} (use ./...)"
            assert (REPO / source).exists(), f"{name}: bind mount source {source} does not exist"


def test_postgres_creates_every_service_database(services: dict[str, dict[str, Any]]) -> None:
    postgres = services["postgres"]
    assert re.fullmatch(r"postgres:\d+(\.\d+)?", postgres["image"]), postgres["image"]
    assert "healthcheck" in postgres
    env = env_of(postgres)
    assert env["POSTGRES_USER"] == "gridloop" and env["POSTGRES_PASSWORD"] == "gridloop"
    init_scripts = [REPO / source for source in bind_sources(postgres) if source.endswith(".sql")]
    assert init_scripts, "postgres mounts no init .sql script"
    sql = "\n".join(path.read_text(encoding="utf-8") for path in init_scripts)
    for name in APP_SERVICES:
        assert re.search(rf"'{name}'", sql), f"init script does not create database {name}"


def test_prometheus_scrapes_every_service(services: dict[str, dict[str, Any]]) -> None:
    config_mounts = [s for s in bind_sources(services["prometheus"]) if s.endswith("prometheus.yml")]
    assert config_mounts, "prometheus does not mount a prometheus.yml"
    config = yaml.safe_load((REPO / config_mounts[0]).read_text(encoding="utf-8"))
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    for name, port in APP_PORTS.items():
        assert f"{name}:{port}" in targets, f"prometheus does not scrape {name}:{port}"


def test_grafana_datasource_points_at_prometheus(services: dict[str, dict[str, Any]]) -> None:
    assert any(s.endswith("infra/grafana/provisioning") for s in bind_sources(services["grafana"]))
    datasource = yaml.safe_load(
        (REPO / "infra/grafana/provisioning/datasources/prometheus.yml").read_text(encoding="utf-8")
    )
    urls = {ds["url"] for ds in datasource["datasources"]}
    assert "http://prometheus:9090" in urls


def test_dockerfile_builds_the_services() -> None:
    dockerfile = REPO / "Dockerfile"
    assert dockerfile.is_file(), "Dockerfile is missing"
    text = dockerfile.read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11", text, re.MULTILINE)
    assert "uv sync --frozen --no-dev" in text
    for directory in ("schemas/", "services/"):
        assert re.search(rf"^COPY {directory}", text, re.MULTILINE), f"Dockerfile does not copy {directory}"
        assert (REPO / directory).is_dir(), f"{directory} is missing from the repository"
    for path in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for source in path.split():
            if not source.startswith("--"):
                assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"


def test_dockerignore_keeps_state_out_and_sources_in() -> None:
    ignore = REPO / ".dockerignore"
    assert ignore.is_file(), ".dockerignore is missing"
    patterns = {
        line.strip().rstrip("/")
        for line in ignore.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    for required in ("var", ".venv", "infra/kafka/.dist"):
        assert required in patterns, f".dockerignore does not exclude {required}/"
    for needed in ("schemas", "services", "pyproject.toml", "uv.lock", "README.md"):
        assert needed not in patterns, f".dockerignore excludes {needed}, which the image needs"


def test_kafka_asks_every_service_for_its_own_sasl_credentials() -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services = compose["services"]
    kafka_env = services["kafka"]["environment"]
    assert "CLIENT:SASL_PLAINTEXT" in kafka_env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    jaas = kafka_env["KAFKA_LISTENER_NAME_CLIENT_PLAIN_SASL_JAAS_CONFIG"]
    users = set()
    for name in (*APP_SERVICES, "kafka-init"):
        env = services[name]["environment"]
        assert env["GRIDLOOP_KAFKA_BOOTSTRAP"] == "kafka:9094"
        assert env["GRIDLOOP_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT"
        user = env["GRIDLOOP_KAFKA_SASL_USERNAME"]
        assert user == (name if name in APP_SERVICES else "admin"), f"{name} connects as {user}"
        assert f'user_{user}="' in jaas, f"{name}'s Kafka user {user} is not defined on the broker"
        assert env["GRIDLOOP_KAFKA_SASL_PASSWORD"].startswith(f"${{GRIDLOOP_KAFKA_PASSWORD_{user.upper()}")
        users.add(user)
    assert len(users) == 6, "each service connects with credentials of its own"
    assert set(APP_SERVICES) == set(SERVICES), "the ACLs are granted to the catalog's services: each must run"


def listener_protocols(env: dict[str, str]) -> dict[str, str]:
    """listener name -> security protocol, for each listener the broker opens."""
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    return {item.split("://")[0]: protocols[item.split("://")[0]] for item in env["KAFKA_LISTENERS"].split(",")}


def test_the_broker_allows_only_what_an_acl_allows(services: dict[str, dict[str, Any]]) -> None:
    env = env_of(services["kafka"])
    assert env["KAFKA_AUTHORIZER_CLASS_NAME"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert env["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"].lower() == "false"
    super_users = set(env["KAFKA_SUPER_USERS"].split(";"))
    assert super_users == {"User:broker", "User:admin"}, "no service, and never User:ANONYMOUS, is a super user"


def test_every_listener_a_client_can_reach_asks_for_credentials(services: dict[str, dict[str, Any]]) -> None:
    env = env_of(services["kafka"])
    for name, protocol in listener_protocols(env).items():
        address = next(item for item in env["KAFKA_LISTENERS"].split(",") if item.startswith(f"{name}://"))
        if protocol == "PLAINTEXT":
            # the health check's: on the container's loopback, where the anonymous principal is granted nothing
            assert address.split("://")[1].startswith(("localhost:", "127.0.0.1:")), address
        else:
            assert protocol.startswith("SASL_"), f"{name} is {protocol}"
    assert listener_protocols(env)[env["KAFKA_CONTROLLER_LISTENER_NAMES"]].startswith("SASL_")
    inter_broker = env["KAFKA_INTER_BROKER_LISTENER_NAME"]
    assert listener_protocols(env)[inter_broker].startswith("SASL_")
    for listener in (name for name, protocol in listener_protocols(env).items() if protocol.startswith("SASL_")):
        jaas = env[f"KAFKA_LISTENER_NAME_{listener}_PLAIN_SASL_JAAS_CONFIG"]
        assert 'username="broker"' in jaas and 'user_broker="' in jaas, f"{listener}: the broker cannot log in"
    assert "localhost:9092" in " ".join(services["kafka"]["healthcheck"]["test"])
