import pytest

from labbus.events.config import ConfigError, load


def test_defaults():
    cfg = load({})
    assert cfg.kafka_bootstrap == "127.0.0.1:19092" and cfg.api_port == 8000
    assert cfg.max_reading_age_days == 3650
    assert load({"LABBUS_MAX_READING_AGE_DAYS": "30"}).max_reading_age_days == 30


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
])
def test_bad_values_name_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        load(env)


def test_explicitly_set():
    cfg = load({"LABBUS_KAFKA_BOOTSTRAP": "h:1"})
    assert cfg.explicitly_set("kafka_bootstrap")
    assert not cfg.explicitly_set("mongo_url")
