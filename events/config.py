"""Configuration from environment variables, with documented defaults.

Every setting has one environment variable; a bad value raises ConfigError naming it.
The table in README.md is generated from SETTINGS below (`labbus config`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from labbus.events.labware import DEFAULT_DECK, DeckLayout, load_deck


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""




@dataclass(frozen=True)
class Setting:
    env: str
    default: str
    help: str


SETTINGS: dict[str, Setting] = {
    "home": Setting("LABBUS_HOME", "./.local",
                    "Directory for local services' binaries, data and logs (relative paths "
                    "start at the working directory)."),
    "kafka_bootstrap": Setting("LABBUS_KAFKA_BOOTSTRAP", "127.0.0.1:19092",
                               "Kafka bootstrap servers (host:port[,host:port])."),
    "kafka_security_protocol": Setting(
        "LABBUS_KAFKA_SECURITY_PROTOCOL", "",
        "How clients talk to Kafka: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL. Empty: SASL_SSL "
        "with this process kind's own credentials when the broker is the local one of `labbus "
        "services up` (LABBUS_HOME/kafka/security/credentials.json names its address), else "
        "PLAINTEXT."),
    "kafka_sasl_mechanism": Setting("LABBUS_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512",
                                    "SASL mechanism: SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN."),
    "kafka_username": Setting("LABBUS_KAFKA_USERNAME", "",
                              "SASL user name (empty: the local principal of the process kind, "
                              "see \"The bus: who may write where\")."),
    "kafka_password": Setting("LABBUS_KAFKA_PASSWORD", "",
                              "SASL password (empty: the local credentials file's, for the "
                              "local broker)."),
    "kafka_ca_file": Setting("LABBUS_KAFKA_CA_FILE", "",
                             "PEM file of the CA(s) the broker's certificate chains to (empty: "
                             "the local CA for the local broker, else the system's trust "
                             "store)."),
    "postgres_dsn": Setting("LABBUS_POSTGRES_DSN",
                            "postgresql://labbus_writer:labbus_writer@127.0.0.1:15432/labbus",
                            "PostgreSQL DSN of the writer role used by projectors and migrations."),
    "postgres_api_dsn": Setting("LABBUS_POSTGRES_API_DSN",
                                "postgresql://labbus_reader:labbus_reader@127.0.0.1:15432/labbus",
                                "PostgreSQL DSN of the SELECT-only role used by the query API."),
    "mongo_url": Setting("LABBUS_MONGO_URL", "mongodb://127.0.0.1:27018",
                         "MongoDB connection URL."),
    "mongo_db": Setting("LABBUS_MONGO_DB", "labbus", "MongoDB database name."),
    "namespace": Setting("LABBUS_NAMESPACE", "",
                         "Prefix for topic names and consumer groups (isolates test runs)."),
    "api_host": Setting("LABBUS_API_HOST", "127.0.0.1", "Query API bind address."),
    "api_port": Setting("LABBUS_API_PORT", "8000", "Query API port."),
    "metrics_port": Setting("LABBUS_METRICS_PORT", "0",
                            "Prometheus /metrics port of a worker process "
                            "(0 = the process default)."),
    "log_level": Setting("LABBUS_LOG_LEVEL", "INFO", "Log level: DEBUG, INFO, WARNING, ERROR."),
    "max_clock_skew_s": Setting("LABBUS_MAX_CLOCK_SKEW_S", "5",
                                "Readings timestamped further than this into the future "
                                "are rejected."),
    "max_reading_age_days": Setting("LABBUS_MAX_READING_AGE_DAYS", "3650",
                                    "Readings whose device timestamp is older than this many days "
                                    "are rejected (whole days, 1 to 3650000; timestamps the read "
                                    "models cannot hold are rejected whatever this says)."),
    "measurement_retention_days": Setting(
        "LABBUS_MEASUREMENT_RETENTION_DAYS", "365",
        "Days of readings PostgreSQL keeps (today counts as one, 1 to 36500): older daily "
        "partitions of `measurements` are dropped by the projector's hourly maintenance and "
        "`labbus db partitions`."),
    "group_instance_id": Setting("LABBUS_GROUP_INSTANCE_ID", "",
                                 "Static consumer-group membership (Kafka KIP-345) for every "
                                 "process that consumes in a group (validator, faust "
                                 "processors, projectors, agents): a name unique among the "
                                 "running processes of its kind and stable across its restarts "
                                 "(e.g. a StatefulSet pod name); a process restarted after a "
                                 "crash gets its partitions back at once instead of after the "
                                 "10 s session timeout, but one stopped gracefully holds them "
                                 "for that timeout. Empty: dynamic membership."),
    "pki_dir": Setting("LABBUS_PKI_DIR", "",
                       "The device certificate authority's files (`labbus devices`); empty = "
                       "LABBUS_HOME/pki."),
    "gateway_host": Setting("LABBUS_GATEWAY_HOST", "127.0.0.1",
                            "gRPC instrument gateway bind address (plain text, `--insecure`, "
                            "only on loopback)."),
    "gateway_port": Setting("LABBUS_GATEWAY_PORT", "50051", "gRPC instrument gateway port."),
    "gateway_max_inflight": Setting("LABBUS_GATEWAY_MAX_INFLIGHT", "256",
                                    "Messages of one device stream the gateway holds until the "
                                    "broker acknowledges them; at the limit it stops reading "
                                    "that stream (gRPC flow control pushes back on the device)."),
    "gateway_command_lookback_s": Setting("LABBUS_GATEWAY_COMMAND_LOOKBACK_S", "3600",
                                          "At start the gateway reads this many seconds of "
                                          "lab.commands back to find commands still open; a "
                                          "command should expire sooner than this."),
    "offline_after_intervals": Setting(
        "LABBUS_OFFLINE_AFTER_INTERVALS", "3",
        "The device processor declares a device OFFLINE when no heartbeat came for this many of "
        "its expected intervals (a number > 0; see \"Device status and commands\")."),
    "command_schemas": Setting(
        "LABBUS_COMMAND_SCHEMAS", "",
        "Directory of command JSON Schemas, <dir>/<device type>/<command type>.json (empty = "
        "the built-in schemas/commands)."),
    "quality_future_s": Setting("LABBUS_QUALITY_FUTURE_S", "1",
                                "Validated readings whose device time is more than this many "
                                "seconds ahead of the validator's clock get quality suspect "
                                "(rule future_time); LABBUS_MAX_CLOCK_SKEW_S rejects them."),
    "quality_horizon_s": Setting("LABBUS_QUALITY_HORIZON_S", "3600",
                                 "Validated readings whose device time is older than this many "
                                 "seconds get quality suspect (rule stale); "
                                 "LABBUS_MAX_READING_AGE_DAYS rejects them."),
    "anomaly_threshold": Setting("LABBUS_ANOMALY_THRESHOLD", "4",
                                 "`process anomalies`: a reading whose |z-score| against its "
                                 "device and metric's rolling statistics exceeds this is flagged "
                                 "(AnomalyDetected on lab.alerts); > 0."),
    "anomaly_warmup": Setting("LABBUS_ANOMALY_WARMUP", "20",
                              "`process anomalies`: readings of a device and metric that build "
                              "its statistics before any is judged (2 to 1000000)."),
    "anomaly_alpha": Setting("LABBUS_ANOMALY_ALPHA", "0.05",
                             "`process anomalies`: weight of a new reading in the exponentially "
                             "weighted mean and variance (0 < alpha < 1; about 2/alpha readings "
                             "make the window)."),
    "testing_speed": Setting("LABBUS_TESTING_SPEED", "1",
                             "Test protocols: simulated seconds per wall second. The simulated PV "
                             "instruments (`labbus agent pv`) run a step's duration in its "
                             "duration / this, and `process testing` allows a step its "
                             "timeout_s / this (at least LABBUS_TESTING_MIN_TIMEOUT_S); > 0."),
    "testing_min_timeout_s": Setting("LABBUS_TESTING_MIN_TIMEOUT_S", "30",
                                     "Test protocols: the least wall time `process testing` "
                                     "allows a step (broker round trips and publishing the "
                                     "readings are not compressed by LABBUS_TESTING_SPEED); "
                                     "1 to 86400."),
    "deck_layout": Setting("LABBUS_DECK_LAYOUT", "",
                           "JSON file with the OT-2 deck layout: which stock (dyes, water) is in "
                           "which reservoir well and how much, the deck slots, the pipette mount "
                           "(empty = the built-in default, see \"Labware rules\")."),
    "webhooks_config": Setting(
        "LABBUS_WEBHOOKS_CONFIG", "",
        "`labbus webhooks`: the TOML or JSON file of its targets (name, URL, secret, event "
        "types, attempts, backoff), see \"Webhooks\"; empty = no targets (the command refuses "
        "to start)."),
    "artifacts": Setting(
        "LABBUS_ARTIFACTS", "gridfs",
        "Where reports and other artifacts are stored, once per sha256 (events/artifacts.py): "
        "`gridfs` = a GridFS bucket (`artifacts`) of LABBUS_MONGO_DB, or an existing directory "
        "(a file store)."),
    "report_renderers": Setting(
        "LABBUS_REPORT_RENDERERS", "1",
        "`process reports`: processes each worker renders reports in (one report at a time "
        "each), so its event loop goes on meanwhile; 0 = in the event loop itself (it waits); "
        "0 to 16."),
    # -- identity and tokens (README "Identity and tokens") --
    "http_gateway_host": Setting("LABBUS_HTTP_GATEWAY_HOST", "127.0.0.1",
                                 "Command gateway (`labbus gateway http`) bind address."),
    "http_gateway_port": Setting("LABBUS_HTTP_GATEWAY_PORT", "8001",
                                 "Command gateway port; the built-in token issuer serves there."),
    "query_api_url": Setting("LABBUS_QUERY_API_URL", "",
                             "Where the query API is reached, for the `Location` of the command "
                             "gateway's 202 answers (empty = http://LABBUS_API_HOST:"
                             "LABBUS_API_PORT)."),
    "gateway_url": Setting("LABBUS_GATEWAY_URL", "",
                           "Where the CLI reaches the command gateway (`labbus login`, "
                           "`experiment start`, `command send` with a token; empty = "
                           "http://LABBUS_HTTP_GATEWAY_HOST:LABBUS_HTTP_GATEWAY_PORT)."),
    "token_file": Setting("LABBUS_TOKEN_FILE", "~/.config/labbus/token.json",
                          "Where `labbus login` keeps the token (mode 0600) the CLI sends to "
                          "the command gateway."),
    "auth_issuer": Setting("LABBUS_AUTH_ISSUER", "",
                           "The OIDC issuer whose tokens labbus accepts (its `iss`; discovery at "
                           "`<issuer>/.well-known/openid-configuration`). https, or http on a "
                           "loopback address. Empty = the built-in issuer, "
                           "http://LABBUS_HTTP_GATEWAY_HOST:LABBUS_HTTP_GATEWAY_PORT."),
    "auth_built_in": Setting("LABBUS_AUTH_BUILT_IN", "auto",
                             "Whether the command gateway runs the built-in issuer (POST "
                             "/auth/token, its JWKS): `on`, `off`, or `auto` = on when "
                             "LABBUS_AUTH_ISSUER is empty. `on` with LABBUS_AUTH_ISSUER set: the "
                             "built-in issuer is reached at that URL (e.g. behind a TLS proxy)."),
    "auth_jwks_url": Setting("LABBUS_AUTH_JWKS_URL", "",
                             "The issuer's JWKS (signing keys); empty = the `jwks_uri` of its "
                             "discovery document."),
    "auth_audience": Setting("LABBUS_AUTH_AUDIENCE", "labbus",
                             "The `aud` a token must carry (the built-in issuer writes it)."),
    "auth_roles_claim": Setting("LABBUS_AUTH_ROLES_CLAIM", "roles",
                                "Dotted path of the roles claim in a token: `roles` (labbus, "
                                "Entra ID), `realm_access.roles` (Keycloak realm roles), "
                                "`resource_access.<client>.roles` (Keycloak client roles)."),
    "auth_algorithms": Setting("LABBUS_AUTH_ALGORITHMS", "ES256,EdDSA,RS256",
                               "Signature algorithms accepted, comma-separated; asymmetric ones "
                               "only (ES256/384/512, RS256/384/512, PS256/384/512, EdDSA)."),
    "auth_leeway_s": Setting("LABBUS_AUTH_LEEWAY_S", "30",
                             "Clock skew tolerated on exp/nbf/iat, seconds (0 to 300)."),
    "auth_jwks_cache_s": Setting("LABBUS_AUTH_JWKS_CACHE_S", "300",
                                 "Seconds the issuer's keys are kept before they are fetched "
                                 "again (10 to 86400)."),
    "auth_jwks_min_refresh_s": Setting("LABBUS_AUTH_JWKS_MIN_REFRESH_S", "10",
                                       "A token signed with an unknown key (`kid`) makes the "
                                       "keys be fetched again, at most once per this many "
                                       "seconds (0 to 3600)."),
    "auth_token_ttl_s": Setting("LABBUS_AUTH_TOKEN_TTL_S", "900",
                                "Lifetime of a token of the built-in issuer, seconds (60 to "
                                "86400): a disabled user or a revoked role keeps working this "
                                "long at most."),
    "auth_keys_dir": Setting("LABBUS_AUTH_KEYS_DIR", "",
                             "The built-in issuer's signing key (made on first use, mode 0600); "
                             "empty = LABBUS_HOME/auth."),
}


@dataclass(frozen=True)
class Config:
    home: Path
    kafka_bootstrap: str
    kafka_security_protocol: str
    kafka_sasl_mechanism: str
    kafka_username: str
    kafka_password: str
    kafka_ca_file: Path | None
    postgres_dsn: str
    postgres_api_dsn: str
    mongo_url: str
    mongo_db: str
    namespace: str
    api_host: str
    api_port: int
    metrics_port: int
    log_level: str
    max_clock_skew_s: float
    max_reading_age_days: int
    measurement_retention_days: int
    group_instance_id: str
    pki_dir: Path
    gateway_host: str
    gateway_port: int
    gateway_max_inflight: int
    gateway_command_lookback_s: int
    offline_after_intervals: float = 3.0
    command_schemas: Path | None = None
    quality_future_s: float = 1.0
    quality_horizon_s: float = 3600.0
    anomaly_threshold: float = 4.0
    anomaly_warmup: int = 20
    anomaly_alpha: float = 0.05
    testing_speed: float = 1.0
    testing_min_timeout_s: float = 30.0
    deck_layout: DeckLayout = DEFAULT_DECK
    webhooks_config: Path | None = None
    artifacts: str = "gridfs"  # or the directory of a file store (resolved)
    report_renderers: int = 1
    http_gateway_host: str = "127.0.0.1"
    http_gateway_port: int = 8001
    query_api_url: str = "http://127.0.0.1:8000"
    gateway_url: str = "http://127.0.0.1:8001"
    token_file: Path = Path("~/.config/labbus/token.json")
    auth_issuer: str = "http://127.0.0.1:8001"
    auth_built_in: bool = True
    auth_jwks_url: str = ""
    auth_audience: str = "labbus"
    auth_roles_claim: str = "roles"
    auth_algorithms: tuple[str, ...] = ("ES256", "EdDSA", "RS256")
    auth_leeway_s: float = 30.0
    auth_jwks_cache_s: float = 300.0
    auth_jwks_min_refresh_s: float = 10.0
    auth_token_ttl_s: int = 900
    auth_keys_dir: Path = Path(".local/auth")
    # Not an environment variable: the local principal whose credentials this process's Kafka
    # clients use (labbus.events.access). The CLI sets it per command from the process kind;
    # "" = no Kafka access at all (the query API). Library use (tests, scripts) acts as admin.
    kafka_principal: str = "admin"
    explicit: frozenset[str] = frozenset()

    def explicitly_set(self, name: str) -> bool:
        """True when the user pointed this setting at their own service
        (so nothing local starts)."""
        return name in self.explicit


def _int(name: str, raw: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{SETTINGS[name].env}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise ConfigError(f"{SETTINGS[name].env}={raw!r} must be between {low} and {high}")
    return value


def _float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{SETTINGS[name].env}={raw!r} is not a number") from None
    if value < 0:
        raise ConfigError(f"{SETTINGS[name].env}={raw!r} must not be negative")
    return value


def _positive(name: str, raw: str) -> float:
    value = _float(name, raw)
    if not 0 < value < float("inf"):
        raise ConfigError(f"{SETTINGS[name].env}={raw!r} must be a number greater than 0")
    return value


def _directory(name: str, raw: str) -> Path | None:
    if not raw.strip():
        return None
    path = Path(raw).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"{SETTINGS[name].env}={raw!r} is not a directory")
    return path


def _artifacts(name: str, raw: str) -> str:
    if raw.strip().lower() in ("", "gridfs"):
        return "gridfs"
    return str(_directory(name, raw))


def _open_unit(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{SETTINGS[name].env}={raw!r} is not a number") from None
    if not 0 < value < 1:
        raise ConfigError(f"{SETTINGS[name].env}={raw!r} must be between 0 and 1 (exclusive)")
    return value


def _instance_id(name: str, raw: str) -> str:
    if raw and not all(c.isalnum() or c in "-_." for c in raw):
        raise ConfigError(f"{SETTINGS[name].env}={raw!r}: letters, digits, '-', '_' and '.' only")
    return raw


def _hostports(name: str, raw: str) -> str:
    for part in raw.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(f"{SETTINGS[name].env}={raw!r}: expected host:port[,host:port]")
    return raw


KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")


def _choice(name: str, raw: str, choices: tuple[str, ...], empty_ok: bool = False) -> str:
    value = raw.strip().upper()
    if (value or not empty_ok) and value not in choices:
        raise ConfigError(f"{SETTINGS[name].env}={raw!r}: use one of {', '.join(choices)}"
                          + (" (or leave it empty)" if empty_ok else ""))
    return value


def _file(name: str, raw: str) -> Path | None:
    if not raw.strip():
        return None
    path = Path(raw).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{SETTINGS[name].env}={raw!r} is not a file")
    return path


def _url(name: str, raw: str, schemes: tuple[str, ...]) -> str:
    if not raw.startswith(tuple(s + "://" for s in schemes)):
        raise ConfigError(f"{SETTINGS[name].env}={raw!r}: expected a URL starting with "
                          + " or ".join(s + "://" for s in schemes))
    return raw


def _deck(name: str, raw: str) -> DeckLayout:
    if not raw.strip():
        return DEFAULT_DECK
    try:
        return load_deck(Path(raw).expanduser())
    except ValueError as exc:
        raise ConfigError(f"{SETTINGS[name].env}={raw!r}: {exc}") from None


ASYMMETRIC_ALGORITHMS = ("ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256",
                         "PS384", "PS512", "EdDSA")


def _https_url(name: str, raw: str) -> str:
    """https, or http on a loopback address (keys and passwords in plain text nowhere else)."""
    from urllib.parse import urlsplit

    parts = urlsplit(raw)
    host = parts.hostname or ""
    loopback = host.startswith("127.") or host in ("localhost", "::1")
    if (parts.scheme == "https" and host) or (parts.scheme == "http" and loopback):
        return raw
    raise ConfigError(f"{SETTINGS[name].env}={raw!r}: expected an https:// URL "
                      "(http:// only on a loopback address)")


def _algorithms(name: str, raw: str) -> tuple[str, ...]:
    algs = tuple(a.strip() for a in raw.split(",") if a.strip())
    bad = [a for a in algs if a not in ASYMMETRIC_ALGORITHMS]
    if not algs or bad:
        raise ConfigError(f"{SETTINGS[name].env}={raw!r}: asymmetric algorithms only, from "
                          + ", ".join(ASYMMETRIC_ALGORITHMS))
    return algs


def _claim_path(name: str, raw: str) -> str:
    if not raw or any(not part for part in raw.split(".")):
        raise ConfigError(f"{SETTINGS[name].env}={raw!r}: a claim name or a dotted path, e.g. "
                          "roles or realm_access.roles")
    return raw


def _bounded(name: str, raw: str, low: float, high: float) -> float:
    value = _float(name, raw)
    if not low <= value <= high:
        raise ConfigError(f"{SETTINGS[name].env}={raw!r} must be between {low:g} and {high:g}")
    return value


def _built_in(name: str, raw: str, issuer: str) -> bool:
    value = raw.strip().lower()
    if value not in ("auto", "on", "off"):
        raise ConfigError(f"{SETTINGS[name].env}={raw!r}: use auto, on or off")
    return value == "on" or (value == "auto" and not issuer.strip())


def _local_url(host: str, port: int) -> str:
    """The URL of a labbus HTTP service bound to host:port (a wildcard bind is reached on
    loopback): the built-in issuer's (the command gateway's), the query API's."""
    host = "127.0.0.1" if host in ("", "0.0.0.0") else "[::1]" if host == "::" else host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{host}:{port}"


def load(environ: dict[str, str] | None = None) -> Config:
    env = os.environ if environ is None else environ
    raw = {name: env.get(s.env, s.default) for name, s in SETTINGS.items()}
    level = raw["log_level"].upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError(f"LABBUS_LOG_LEVEL={raw['log_level']!r}: "
                          "use DEBUG, INFO, WARNING or ERROR")
    http_port = _int("http_gateway_port", raw["http_gateway_port"], 1, 65535)
    namespace = raw["namespace"]
    if namespace and not all(c.isalnum() or c in "-_." for c in namespace):
        raise ConfigError(f"LABBUS_NAMESPACE={namespace!r}: letters, digits, '-', '_' and '.' only")
    return Config(
        home=Path(raw["home"]).expanduser().resolve(),
        kafka_bootstrap=_hostports("kafka_bootstrap", raw["kafka_bootstrap"]),
        kafka_security_protocol=_choice("kafka_security_protocol",
                                        raw["kafka_security_protocol"], KAFKA_PROTOCOLS,
                                        empty_ok=True),
        kafka_sasl_mechanism=_choice("kafka_sasl_mechanism", raw["kafka_sasl_mechanism"],
                                     SASL_MECHANISMS),
        kafka_username=raw["kafka_username"].strip(),
        kafka_password=raw["kafka_password"],
        kafka_ca_file=_file("kafka_ca_file", raw["kafka_ca_file"]),
        postgres_dsn=_url("postgres_dsn", raw["postgres_dsn"], ("postgresql", "postgres")),
        postgres_api_dsn=_url("postgres_api_dsn", raw["postgres_api_dsn"],
                              ("postgresql", "postgres")),
        mongo_url=_url("mongo_url", raw["mongo_url"], ("mongodb", "mongodb+srv")),
        mongo_db=raw["mongo_db"] or "labbus",
        namespace=namespace,
        api_host=raw["api_host"],
        api_port=_int("api_port", raw["api_port"], 1, 65535),
        metrics_port=_int("metrics_port", raw["metrics_port"], 0, 65535),
        log_level=level,
        max_clock_skew_s=_float("max_clock_skew_s", raw["max_clock_skew_s"]),
        max_reading_age_days=_int("max_reading_age_days", raw["max_reading_age_days"],
                                  1, 3_650_000),
        measurement_retention_days=_int("measurement_retention_days",
                                        raw["measurement_retention_days"], 1, 36_500),
        group_instance_id=_instance_id("group_instance_id", raw["group_instance_id"]),
        pki_dir=(Path(raw["pki_dir"]).expanduser().resolve() if raw["pki_dir"].strip()
                 else Path(raw["home"]).expanduser().resolve() / "pki"),
        gateway_host=raw["gateway_host"],
        gateway_port=_int("gateway_port", raw["gateway_port"], 1, 65535),
        gateway_max_inflight=_int("gateway_max_inflight", raw["gateway_max_inflight"], 1, 100_000),
        gateway_command_lookback_s=_int("gateway_command_lookback_s",
                                        raw["gateway_command_lookback_s"], 1, 90 * 86400),
        offline_after_intervals=_positive("offline_after_intervals",
                                          raw["offline_after_intervals"]),
        command_schemas=_directory("command_schemas", raw["command_schemas"]),
        quality_future_s=_positive("quality_future_s", raw["quality_future_s"]),
        quality_horizon_s=_positive("quality_horizon_s", raw["quality_horizon_s"]),
        anomaly_threshold=_positive("anomaly_threshold", raw["anomaly_threshold"]),
        anomaly_warmup=_int("anomaly_warmup", raw["anomaly_warmup"], 2, 1_000_000),
        anomaly_alpha=_open_unit("anomaly_alpha", raw["anomaly_alpha"]),
        testing_speed=_positive("testing_speed", raw["testing_speed"]),
        testing_min_timeout_s=_bounded("testing_min_timeout_s", raw["testing_min_timeout_s"],
                                       1, 86400),
        deck_layout=_deck("deck_layout", raw["deck_layout"]),
        webhooks_config=_file("webhooks_config", raw["webhooks_config"]),
        artifacts=_artifacts("artifacts", raw["artifacts"]),
        report_renderers=_int("report_renderers", raw["report_renderers"], 0, 16),
        http_gateway_host=raw["http_gateway_host"],
        http_gateway_port=http_port,
        query_api_url=(raw["query_api_url"].strip().rstrip("/")
                       or _local_url(raw["api_host"], _int("api_port", raw["api_port"], 1, 65535))),
        gateway_url=(_url("gateway_url", raw["gateway_url"].strip().rstrip("/"),
                          ("http", "https"))
                     if raw["gateway_url"].strip()
                     else _local_url(raw["http_gateway_host"], http_port)),
        token_file=Path(raw["token_file"]).expanduser(),
        auth_issuer=_https_url("auth_issuer", raw["auth_issuer"].strip()
                               or _local_url(raw["http_gateway_host"], http_port)),
        auth_built_in=_built_in("auth_built_in", raw["auth_built_in"], raw["auth_issuer"]),
        auth_jwks_url=(_https_url("auth_jwks_url", raw["auth_jwks_url"].strip())
                       if raw["auth_jwks_url"].strip() else ""),
        auth_audience=raw["auth_audience"] or "labbus",
        auth_roles_claim=_claim_path("auth_roles_claim", raw["auth_roles_claim"].strip()),
        auth_algorithms=_algorithms("auth_algorithms", raw["auth_algorithms"]),
        auth_leeway_s=_bounded("auth_leeway_s", raw["auth_leeway_s"], 0, 300),
        auth_jwks_cache_s=_bounded("auth_jwks_cache_s", raw["auth_jwks_cache_s"], 10, 86400),
        auth_jwks_min_refresh_s=_bounded("auth_jwks_min_refresh_s",
                                         raw["auth_jwks_min_refresh_s"], 0, 3600),
        auth_token_ttl_s=_int("auth_token_ttl_s", raw["auth_token_ttl_s"], 60, 86400),
        auth_keys_dir=(Path(raw["auth_keys_dir"]).expanduser().resolve()
                       if raw["auth_keys_dir"].strip()
                       else Path(raw["home"]).expanduser().resolve() / "auth"),
        explicit=frozenset(name for name, s in SETTINGS.items() if s.env in env),
    )


assert {f.name for f in fields(Config)} - {"explicit", "kafka_principal"} == set(SETTINGS), (
    "SETTINGS and Config disagree")
