"""A stand-in OpenID provider for tests: a real HTTP server on loopback that publishes a
discovery document and a JWKS (keys made by the test) and counts the requests it gets."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Provider:
    """A real HTTP server on loopback publishing discovery and a JWKS; counts requests."""

    def __init__(self) -> None:
        self.docs: dict[str, dict] = {}
        self.hits: dict[str, int] = {}
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                issuer.hits[self.path] = issuer.hits.get(self.path, 0) + 1
                doc = issuer.docs.get(self.path)
                body = json.dumps(doc).encode() if doc is not None else b"{}"
                self.send_response(200 if doc is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.publish()

    def publish(self, *keys, issuer: str | None = None) -> None:
        self.docs["/.well-known/openid-configuration"] = {
            "issuer": issuer or self.url, "jwks_uri": self.url + "/jwks"}
        self.docs["/jwks"] = {"keys": [k if isinstance(k, dict) else k.jwk for k in keys]}

    @property
    def jwks_fetches(self) -> int:
        return self.hits.get("/jwks", 0)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
