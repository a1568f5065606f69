"""Every labbus consumer-group member recovers from a crash in about 10 s, not faust's 60 s: the
session and heartbeat settings (measured end to end in
tests/integration/test_validator_recovery.py)."""

from labbus.events import config, kafka
from labbus.processors import validator


async def test_kafka_consumers_have_a_10_s_session():
    consumer = kafka.consumer(config.load({}), "t", group="g")
    assert consumer._coordinator is None  # not started: the options are all there is
    assert consumer._session_timeout_ms == 10_000
    assert consumer._heartbeat_interval_ms == 3_000
    assert kafka.consumer(config.load({}), group="g",
                          session_timeout_ms=6_000)._session_timeout_ms == 6_000


def test_the_validator_has_a_10_s_session_and_optional_static_membership(tmp_path):
    app = validator.build_app(config.load({"LABBUS_HOME": str(tmp_path)}))
    assert app.conf.broker_session_timeout == 10.0
    assert app.conf.broker_heartbeat_interval == 3.0
    assert app.conf.consumer_group_instance_id is None
    static = validator.build_app(config.load({"LABBUS_HOME": str(tmp_path),
                                              "LABBUS_GROUP_INSTANCE_ID": "validator-0"}))
    assert static.conf.consumer_group_instance_id == "validator-0"
