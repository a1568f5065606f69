import pytest

from labbus.events.config import ConfigError, load


def test_defaults():
    cfg = load({})
    assert cfg.kafka_bootstrap == "127.0.0.1:19092" and cfg.api_port == 8000
    assert cfg.max_reading_age_days == 3650
    assert load({"LABBUS_MAX_READING_AGE_DAYS": "30"}).max_reading_age_days == 30
    assert cfg.measurement_retention_days == 365
    assert load({"LABBUS_MEASUREMENT_RETENTION_DAYS": "30"}).measurement_retention_days == 30


@pytest.mark.parametrize("env,variable", [
    ({"LABBUS_API_PORT": "eighty"}, "LABBUS_API_PORT"),
    ({"LABBUS_API_PORT": "70000"}, "LABBUS_API_PORT"),
    ({"LABBUS_KAFKA_BOOTSTRAP": "localhost"}, "LABBUS_KAFKA_BOOTSTRAP"),
    ({"LABBUS_POSTGRES_DSN": "mysql://x"}, "LABBUS_POSTGRES_DSN"),
    ({"LABBUS_MONGO_URL": "127.0.0.1:27017"}, "LABBUS_MONGO_URL"),
    ({"LABBUS_LOG_LEVEL": "LOUD"}, "LABBUS_LOG_LEVEL"),
    ({"LABBUS_NAMESPACE": "a b"}, "LABBUS_NAMESPACE"),
    ({"LABBUS_MAX_CLOCK_SKEW_S": "-1"}, "LABBUS_MAX_CLOCK_SKEW_S"),
    ({"LABBUS_MAX_READING_AGE_DAYS": "ten"}, "LABBUS_MAX_READING_AGE_DAYS"),
    ({"LABBUS_MAX_READING_AGE_DAYS": "0"}, "LABBUS_MAX_READING_AGE_DAYS"),
    ({"LABBUS_MAX_READING_AGE_DAYS": "-5"}, "LABBUS_MAX_READING_AGE_DAYS"),
    ({"LABBUS_MAX_READING_AGE_DAYS": "1.5"}, "LABBUS_MAX_READING_AGE_DAYS"),
    ({"LABBUS_MAX_READING_AGE_DAYS": "99999999"}, "LABBUS_MAX_READING_AGE_DAYS"),
    ({"LABBUS_GROUP_INSTANCE_ID": "pod 1"}, "LABBUS_GROUP_INSTANCE_ID"),
    ({"LABBUS_MEASUREMENT_RETENTION_DAYS": "0"}, "LABBUS_MEASUREMENT_RETENTION_DAYS"),
    ({"LABBUS_MEASUREMENT_RETENTION_DAYS": "a year"}, "LABBUS_MEASUREMENT_RETENTION_DAYS"),
    ({"LABBUS_MEASUREMENT_RETENTION_DAYS": "36501"}, "LABBUS_MEASUREMENT_RETENTION_DAYS"),
    ({"LABBUS_AUTH_ISSUER": "http://idp.lab.example"}, "LABBUS_AUTH_ISSUER"),
    ({"LABBUS_AUTH_ISSUER": "http://localhost.evil.example"}, "LABBUS_AUTH_ISSUER"),
    ({"LABBUS_AUTH_ISSUER": "keycloak/realms/lab"}, "LABBUS_AUTH_ISSUER"),
    ({"LABBUS_AUTH_JWKS_URL": "ftp://idp/keys"}, "LABBUS_AUTH_JWKS_URL"),
    ({"LABBUS_AUTH_ALGORITHMS": "HS256"}, "LABBUS_AUTH_ALGORITHMS"),
    ({"LABBUS_AUTH_ALGORITHMS": "none"}, "LABBUS_AUTH_ALGORITHMS"),
    ({"LABBUS_AUTH_ALGORITHMS": ","}, "LABBUS_AUTH_ALGORITHMS"),
    ({"LABBUS_AUTH_ROLES_CLAIM": "realm_access..roles"}, "LABBUS_AUTH_ROLES_CLAIM"),
    ({"LABBUS_AUTH_LEEWAY_S": "3600"}, "LABBUS_AUTH_LEEWAY_S"),
    ({"LABBUS_AUTH_JWKS_CACHE_S": "1"}, "LABBUS_AUTH_JWKS_CACHE_S"),
    ({"LABBUS_AUTH_JWKS_MIN_REFRESH_S": "-1"}, "LABBUS_AUTH_JWKS_MIN_REFRESH_S"),
    ({"LABBUS_AUTH_TOKEN_TTL_S": "10"}, "LABBUS_AUTH_TOKEN_TTL_S"),
    ({"LABBUS_AUTH_TOKEN_TTL_S": "a day"}, "LABBUS_AUTH_TOKEN_TTL_S"),
    ({"LABBUS_AUTH_BUILT_IN": "maybe"}, "LABBUS_AUTH_BUILT_IN"),
    ({"LABBUS_HTTP_GATEWAY_PORT": "0"}, "LABBUS_HTTP_GATEWAY_PORT"),
])
def test_bad_values_name_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        load(env)


def test_explicitly_set():
    cfg = load({"LABBUS_KAFKA_BOOTSTRAP": "h:1"})
    assert cfg.explicitly_set("kafka_bootstrap")
    assert not cfg.explicitly_set("mongo_url")


def test_identity_defaults_the_built_in_issuer_at_the_gateway():
    cfg = load({"LABBUS_HOME": "/srv/labbus"})
    assert cfg.auth_issuer == "http://127.0.0.1:8001" and cfg.auth_built_in
    assert cfg.auth_audience == "labbus" and cfg.auth_roles_claim == "roles"
    assert cfg.auth_token_ttl_s == 900 and cfg.auth_leeway_s == 30
    assert str(cfg.auth_keys_dir) == "/srv/labbus/auth"
    assert load({"LABBUS_HTTP_GATEWAY_PORT": "9000"}).auth_issuer == "http://127.0.0.1:9000"
    assert load({"LABBUS_HTTP_GATEWAY_HOST": "0.0.0.0"}).auth_issuer == "http://127.0.0.1:8001"
    assert load({"LABBUS_HTTP_GATEWAY_HOST": "::1"}).auth_issuer == "http://[::1]:8001"


def test_an_identity_provider_of_the_lab_turns_the_built_in_issuer_off():
    kc = load({"LABBUS_AUTH_ISSUER": "https://kc.lab.example/realms/lab",
               "LABBUS_AUTH_ROLES_CLAIM": "realm_access.roles",
               "LABBUS_AUTH_ALGORITHMS": "RS256, ES256"})
    assert not kc.auth_built_in and kc.auth_issuer == "https://kc.lab.example/realms/lab"
    assert kc.auth_algorithms == ("RS256", "ES256")
    behind_proxy = load({"LABBUS_AUTH_ISSUER": "https://lab.example/",
                         "LABBUS_AUTH_BUILT_IN": "on"})
    assert behind_proxy.auth_built_in and behind_proxy.auth_issuer == "https://lab.example/"
    assert not load({"LABBUS_AUTH_BUILT_IN": "off"}).auth_built_in
