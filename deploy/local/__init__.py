"""Local development services: a real Kafka broker, PostgreSQL and a MongoDB-compatible server.

Everything lives under ``config.home`` (``LABBUS_HOME``): binaries, data and logs.
Use :func:`deploy.local.services.up` / ``down`` / ``status``.
"""

from labbus.deploy.local.proc import ServiceError, ServiceStatus

__all__ = ["ServiceError", "ServiceStatus"]
