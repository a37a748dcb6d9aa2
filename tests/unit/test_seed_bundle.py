"""The seed bundle parser: untrusted bytes from a removable medium."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from provisioner import seed
from provisioner.errors import ConfigError

pytestmark = pytest.mark.unit


def good() -> dict[str, Any]:
    return {
        "version": seed.BUNDLE_VERSION,
        "node_id": "node-0042",
        "project_id": "p" * 32,
        "user_id": "u" * 32,
        "auth_url": "https://keystone.example.test:5000/v3",
        "region": None,
        "interface": "public",
        "ca_pem": "-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n",
        "pcrs": [7],
        "bootstrap": {
            "application_credential_id": "b" * 32,
            "wrapped": base64.b64encode(b'{"kind": "duplicate"}').decode(),
        },
    }


def offline() -> dict[str, Any]:
    """A seed of `edgepin enroll --offline`: the node's own credential, wrapped."""
    bundle = good()
    bundle["node_credential"] = bundle.pop("bootstrap")
    return bundle


def test_a_good_bundle_parses() -> None:
    assert seed.parse_bundle(json.dumps(good()).encode()) == good()
    assert seed.credential(good()) == (seed.Credential.BOOTSTRAP, good()["bootstrap"])


def test_an_offline_bundle_parses_and_names_the_node_credential() -> None:
    assert seed.parse_bundle(json.dumps(offline()).encode()) == offline()
    kind, cred = seed.credential(offline())
    assert kind is seed.Credential.NODE
    assert cred == offline()["node_credential"]


@pytest.mark.parametrize(
    "bundle",
    [
        {**good(), "node_credential": good()["bootstrap"]},  # both
        {k: v for k, v in good().items() if k != "bootstrap"},  # neither
        {**offline(), "node_credential": []},
        {**offline(), "node_credential": {"application_credential_id": "x", "wrapped": "*"}},
        {**offline(), "node_credential": {"wrapped": good()["bootstrap"]["wrapped"]}},
        {
            **offline(),
            "node_credential": {"application_credential_id": "\x1b[2J", "wrapped": "eA=="},
        },
    ],
)
def test_a_bundle_holds_exactly_one_well_formed_credential(bundle: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        seed.parse_bundle(json.dumps(bundle).encode())


@pytest.mark.parametrize(
    "change",
    [
        {"auth_url": "http://keystone.example.test:5000/v3"},
        {"pcrs": []},
        {"pcrs": [7, 24]},
        {"pcrs": [True]},
        {"interface": "anything"},
        {"node_id": {}},
        {"bootstrap": {"application_credential_id": "x", "wrapped": "not base64!"}},
        {"bootstrap": []},
        {"version": 2},
    ],
)
def test_bad_bundles_are_refused_with_a_config_error(change: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        seed.parse_bundle(json.dumps({**good(), **change}).encode())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=30,
)


@settings(max_examples=300)
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_give_a_bundle_or_a_config_error(data: bytes) -> None:
    try:
        seed.parse_bundle(data)
    except ConfigError:
        pass


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(list(good())), json_values, max_size=6))
def test_any_field_replaced_gives_a_bundle_or_a_config_error(fields: dict[str, Any]) -> None:
    try:
        parsed = seed.parse_bundle(json.dumps({**good(), **fields}).encode())
    except ConfigError:
        return
    assert parsed["auth_url"].startswith("https://") and parsed["pcrs"]


@settings(max_examples=300)
@given(
    st.sampled_from([good(), offline()]),
    st.dictionaries(
        st.sampled_from([*good(), "node_credential"]),
        json_values | st.none().map(lambda _: {"application_credential_id": "x", "wrapped": ""}),
        max_size=6,
    ),
    st.sets(st.sampled_from(["bootstrap", "node_credential"])),
)
def test_any_credential_fields_give_one_credential_or_a_config_error(
    base: dict[str, Any], fields: dict[str, Any], dropped: set[str]
) -> None:
    bundle = {k: v for k, v in {**base, **fields}.items() if k not in dropped}
    try:
        parsed = seed.parse_bundle(json.dumps(bundle).encode())
    except ConfigError:
        return
    kind, cred = seed.credential(parsed)
    assert [k for k in seed.Credential if k.value in parsed] == [kind]
    assert isinstance(cred["application_credential_id"], str)
    base64.b64decode(cred["wrapped"], validate=True)


def test_the_bundle_travels_in_meta_data_and_comes_back_from_cloud_inits_instance_data() -> None:
    import yaml

    meta = yaml.safe_load(seed.meta_data("node-0042", "b" * 32, good()))
    assert meta["instance-id"] == "edgepin-node-0042-" + "b" * 12
    instance = json.dumps({"ds": {"meta_data": meta}, "v1": {}}).encode()
    assert seed.bundle_from_instance_data(instance) == good()
    # a seed that is not edgepin's, or cloud-init's None datasource: no bundle, no error
    assert seed.bundle_from_instance_data(b'{"ds": {"meta_data": {"instance-id": "x"}}}') is None
    assert seed.bundle_from_instance_data(b'{"v1": {}}') is None
    for bad in (
        b"not json",
        b'{"ds": {"meta_data": {"edgepin_bundle": 7}}}',
        b'{"ds": {"meta_data": {"edgepin_bundle": "***"}}}',
    ):
        with pytest.raises(ConfigError):
            seed.bundle_from_instance_data(bad)


@settings(max_examples=300)
@given(
    st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | json_values.map(lambda v: json.dumps({"ds": {"meta_data": {"edgepin_bundle": v}}}).encode())
    | st.binary(max_size=120).map(
        lambda b: json.dumps(
            {"ds": {"meta_data": {"edgepin_bundle": base64.b64encode(b).decode()}}}
        ).encode()
    )
)
def test_any_instance_data_gives_a_bundle_none_or_a_config_error(data: bytes) -> None:
    try:
        got = seed.bundle_from_instance_data(data)
    except ConfigError:
        return
    assert got is None or got["version"] == seed.BUNDLE_VERSION
