"""A downstream system subscribing to labbus: needs only aiokafka, fastavro and schemas/*.avsc.

    python deploy/examples/downstream_consumer.py lab.measurements.validated --max 10

Against a secured broker set the same variables as labbus (README "The bus: who may write
where"): LABBUS_KAFKA_SECURITY_PROTOCOL (e.g. SASL_SSL), LABBUS_KAFKA_SASL_MECHANISM
(SCRAM-SHA-512), LABBUS_KAFKA_USERNAME, LABBUS_KAFKA_PASSWORD, LABBUS_KAFKA_CA_FILE.
"""

import argparse
import asyncio
import io
import json
import os
import ssl
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from fastavro import parse_schema, schemaless_reader
from fastavro.schema import fingerprint, to_parsing_canonical_form

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def load_schemas(folder: Path) -> dict[bytes, dict]:
    """CRC-64-AVRO fingerprint -> parsed schema, for every .avsc (current and previous)."""
    by_fp = {}
    for path in folder.rglob("*.avsc"):
        schema = parse_schema(json.loads(path.read_text()))
        fp = fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")
        by_fp[bytes.fromhex(fp)] = schema
    return by_fp


def decode(message: bytes, schemas: dict[bytes, dict]) -> dict:
    if message[:2] != b"\xc3\x01":  # Avro single-object encoding marker
        raise ValueError("not an Avro single-object message")
    return schemaless_reader(io.BytesIO(message[10:]), schemas[message[2:10]])


def security() -> dict:
    """aiokafka's security options from the environment (PLAINTEXT when none is set)."""
    protocol = os.environ.get("LABBUS_KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT"
    options: dict = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl.create_default_context(
            cafile=os.environ.get("LABBUS_KAFKA_CA_FILE") or None)
    if protocol.startswith("SASL_"):
        options.update(sasl_mechanism=os.environ.get("LABBUS_KAFKA_SASL_MECHANISM",
                                                     "SCRAM-SHA-512"),
                       sasl_plain_username=os.environ["LABBUS_KAFKA_USERNAME"],
                       sasl_plain_password=os.environ["LABBUS_KAFKA_PASSWORD"])
    return options


async def main(topic: str, bootstrap: str, group: str, limit: int) -> None:
    schemas = load_schemas(SCHEMAS)
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                **security())
    await consumer.start()
    try:
        seen = 0
        async for msg in consumer:
            event = decode(msg.value, schemas)
            print(event["event_type"], event["subject"], event.get("metric"), event.get("value"))
            await consumer.commit()  # after handling: at-least-once
            seen += 1
            if limit and seen >= limit:
                break
    finally:
        await consumer.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("topic")
    p.add_argument("--bootstrap", default="127.0.0.1:19092")
    p.add_argument("--group", default="my-downstream-system")
    p.add_argument("--max", type=int, default=0, help="stop after this many events (0 = never)")
    a = p.parse_args()
    asyncio.run(main(a.topic, a.bootstrap, a.group, a.max))
