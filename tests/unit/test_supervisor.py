"""The supervisor's service list, without starting anything: modules exist, addresses come from settings."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys

import pytest

from services.common.settings import ServiceSettings
from services.supervisor import SERVICES, Service, ServiceFailed, check_addresses, port_free, select_services

PORTS = {"intake": 8101, "handling": 8102, "verification": 8103, "opscenter": 8104, "dispatch": 8105}
REQUIRED = ["intake", "dispatch", "handling", "verification"]


@pytest.fixture(autouse=True)
def _no_address_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.upper().startswith("GRIDLOOP_") and key.upper().endswith(("HTTP_PORT", "HTTP_HOST")):
            monkeypatch.delenv(key)


def present(service: Service) -> Service:
    if service.optional and not service.available():
        pytest.skip(f"{service.module} does not exist yet")
    return service


def test_the_list_names_every_service_once() -> None:
    names = [s.name for s in SERVICES]
    assert sorted(names) == sorted(PORTS)
    assert len(set(names)) == len(names)
    assert [s.name for s in SERVICES if not s.optional] == REQUIRED
    assert [s.name for s in SERVICES if s.optional] == ["opscenter"]


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.name)
def test_each_service_is_a_runnable_module(service: Service) -> None:
    present(service)
    assert service.module == f"services.{service.name}"
    assert service.available()
    assert importlib.util.find_spec(f"{service.module}.__main__") is not None
    assert service.command() == [sys.executable, "-m", service.module]


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.name)
def test_each_port_comes_from_the_services_settings(service: Service) -> None:
    present(service)
    cls = service.settings_class()
    assert issubclass(cls, ServiceSettings)
    assert service.name == cls.SERVICE
    assert PORTS[service.name] == cls.DEFAULT_HTTP_PORT
    assert service.settings().http_port == PORTS[service.name]
    assert service.url() == f"http://127.0.0.1:{PORTS[service.name]}"


@pytest.mark.parametrize("service", SERVICES, ids=lambda s: s.name)
def test_environment_overrides_move_the_address(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    present(service)
    key = f"GRIDLOOP_{service.name.upper()}_HTTP_PORT"
    assert service.url({key: "18999"}) == "http://127.0.0.1:18999"
    assert key not in os.environ  # the override is applied for the lookup only
    monkeypatch.setenv(key, "18998")
    assert service.url() == "http://127.0.0.1:18998"
    assert service.url({"GRIDLOOP_HTTP_HOST": "0.0.0.0"}) == "http://127.0.0.1:18998"
    assert os.environ[key] == "18998"


def test_selection() -> None:
    everything = select_services()
    names = [s.name for s in everything]
    assert names[:4] == REQUIRED
    assert ("opscenter" in names) == Service("opscenter", optional=True).available()
    assert [s.name for s in select_services(without=["handling"])] == [n for n in names if n != "handling"]
    assert [s.name for s in select_services(["verification", "intake"])] == ["intake", "verification"]
    with pytest.raises(ServiceFailed, match="unknown"):
        select_services(["nope"])
    with pytest.raises(ServiceFailed, match="unknown"):
        select_services(without=["nope"])


def test_a_taken_or_shared_port_is_refused_before_anything_starts() -> None:
    intake, dispatch = Service("intake"), Service("dispatch")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert not port_free("127.0.0.1", port)
        with pytest.raises(ServiceFailed, match=f"port {port} of intake is in use.*GRIDLOOP_INTAKE_HTTP_PORT"):
            check_addresses([intake, dispatch], {"GRIDLOOP_INTAKE_HTTP_PORT": str(port)})
    assert port_free("127.0.0.1", port)
    with pytest.raises(ServiceFailed, match=f"dispatch and intake are both configured for port {port}"):
        check_addresses(
            [intake, dispatch], {"GRIDLOOP_INTAKE_HTTP_PORT": str(port), "GRIDLOOP_DISPATCH_HTTP_PORT": str(port)}
        )
