"""The README's downstream consumer decodes labbus events with only the .avsc files."""

import os
import subprocess
import sys

from labbus.events import kafka
from labbus.events.codec import default_codec
from labbus.events.model import DeviceRegistered
from tests.conftest import REPO, run


def test_downstream_consumer_example_decodes_events(cfg):
    topic = f"{cfg.namespace}.downstream.example"

    async def publish():
        from labbus.events.topics import TopicSpec

        await kafka.ensure_topics(cfg, (TopicSpec("downstream.example", 1, "device_id", ()),))
        producer = kafka.producer(cfg)
        await producer.start()
        event = DeviceRegistered.create(source="t", subject="dev-x", sequence=1, device_id="dev-x",
                                        device_type="balance", model="m", location="l",
                                        metrics=["weight"])
        await producer.send_and_wait(topic, default_codec().encode(event), key=event.key)
        await producer.stop()

    run(publish())
    sec = kafka.security(cfg)  # the admin's: the example topic is not in the ACL table
    env = {**os.environ, "LABBUS_KAFKA_SECURITY_PROTOCOL": sec.protocol}
    if sec.sasl:
        env.update(LABBUS_KAFKA_SASL_MECHANISM=sec.mechanism, LABBUS_KAFKA_USERNAME=sec.username,
                   LABBUS_KAFKA_PASSWORD=sec.password)
    if sec.ca_file:
        env["LABBUS_KAFKA_CA_FILE"] = str(sec.ca_file)
    out = subprocess.run(
        [sys.executable, str(REPO / "deploy/examples/downstream_consumer.py"), topic,
         "--bootstrap", cfg.kafka_bootstrap, "--group", f"{cfg.namespace}.example", "--max", "1"],
        capture_output=True, text=True, timeout=60, check=True, env=env)
    assert "lab.device.DeviceRegistered dev-x" in out.stdout
