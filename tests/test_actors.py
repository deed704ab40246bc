"""Parsing actor entries and finding this node's own entry, for every form."""

from __future__ import annotations

import pytest

from counterdb.actors import Actor, ConfigError, identify_self, is_local_address, parse_actor, parse_actors


@pytest.mark.parametrize(
    "entry, host, port",
    [
        ("1.2.3.4", "1.2.3.4", None),
        ("1.2.3.4:8081", "1.2.3.4", 8081),
        ("[::1]", "::1", None),
        ("[2001:db8::1]:9000", "2001:db8::1", 9000),
        ("2001:db8::1", "2001:db8::1", None),
        ("node-1.example.com", "node-1.example.com", None),
        ("Node-1.Example.com:80", "node-1.example.com", 80),
        ("localhost", "localhost", None),
    ],
)
def test_entry_forms(entry: str, host: str, port: int | None) -> None:
    actor = parse_actor(entry)
    assert (actor.host, actor.port, actor.entry) == (host, port, entry)


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "1.2.3.4:",
        "1.2.3.4:0",
        "1.2.3.4:65536",
        "1.2.3.4:http",
        "[::1",
        "[1.2.3.4]",
        "[::1]x",
        "bad host",
        "a..b",
        5,
        None,
    ],
)
def test_malformed_entries_are_refused(entry: object) -> None:
    with pytest.raises(ConfigError):
        parse_actor(entry)


def test_base_url_brackets_ipv6_and_fills_in_the_listen_port() -> None:
    assert parse_actor("[::1]").base_url(8080) == "http://[::1]:8080"
    assert parse_actor("10.0.0.1:9000").base_url(8080) == "http://10.0.0.1:9000"


def test_duplicates_include_the_implied_port() -> None:
    with pytest.raises(ConfigError, match="duplicate"):
        parse_actors(["10.0.0.1", "10.0.0.1:8080"], default_port=8080)
    assert len(parse_actors(["10.0.0.1", "10.0.0.1:8081"], default_port=8080)) == 2


def identify(
    entries: list[str],
    port: int = 8080,
    interface: str | None = None,
    advertise: str | None = None,
    local: set[str] = frozenset(),
    dns: dict[str, set[str]] | None = None,
) -> int:
    dns = dns or {}
    return identify_self(
        parse_actors(entries, port),
        port,
        interface,
        parse_actor(advertise) if advertise else None,
        resolve=lambda h: dns.get(h, {h}),
        is_local=lambda ip: ip in local,
    )


def test_advertise_wins() -> None:
    assert identify(["10.0.0.1", "10.0.0.2"], advertise="10.0.0.2", local={"10.0.0.1"}) == 1
    assert identify(["a.example:9000", "b.example:9000"], port=8080, advertise="b.example:9000") == 1


def test_advertise_not_in_list_names_it() -> None:
    with pytest.raises(ConfigError, match=r"--advertise address '10\.0\.0\.9'"):
        identify(["10.0.0.1", "10.0.0.2"], advertise="10.0.0.9")


def test_bound_interface_and_port() -> None:
    entries = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    local = {"127.0.0.2", "127.0.0.3", "127.0.0.4"}  # all of 127/8 is local
    assert identify(entries, interface="127.0.0.3", local=local) == 1


def test_bound_interface_with_explicit_ports() -> None:
    entries = ["127.0.0.1:8001", "127.0.0.1:8002"]
    assert identify(entries, port=8002, interface="127.0.0.1") == 1


def test_bound_interface_matches_a_dns_entry() -> None:
    assert (
        identify(
            ["n1.example", "n2.example"],
            interface="10.0.0.2",
            dns={"n1.example": {"10.0.0.1"}, "n2.example": {"10.0.0.2"}},
        )
        == 1
    )


def test_machine_addresses_when_listening_on_all() -> None:
    assert identify(["10.0.0.1", "10.0.0.2", "10.0.0.3"], interface="0.0.0.0", local={"10.0.0.3"}) == 2
    assert identify(["[2001:db8::1]", "[2001:db8::2]"], local={"2001:db8::2"}) == 1


def test_machine_address_on_another_port_is_not_us() -> None:
    with pytest.raises(ConfigError, match="not in the actors list"):
        identify(["10.0.0.1:9000"], local={"10.0.0.1"})


def test_several_matches_are_refused_with_advice() -> None:
    with pytest.raises(ConfigError, match=r"several actors match.*--advertise"):
        identify(["127.0.0.2", "127.0.0.3"], local={"127.0.0.2", "127.0.0.3"})


def test_not_found_lists_entries_and_what_was_compared() -> None:
    with pytest.raises(ConfigError) as info:
        identify(["10.0.0.1", "10.0.0.2"], interface="10.0.0.5")
    assert "10.0.0.1" in str(info.value) and "10.0.0.5:8080" in str(info.value)


def test_loopback_addresses_are_local_and_documentation_addresses_are_not() -> None:
    assert is_local_address("127.0.0.3")
    assert not is_local_address("192.0.2.1")  # TEST-NET-1: never assigned


def test_actor_is_a_value_type() -> None:
    assert parse_actor("10.0.0.1") == Actor("10.0.0.1", None, "10.0.0.1")
