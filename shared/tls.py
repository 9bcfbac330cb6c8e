"""TLS for every gRPC hop: PEM files by path, re-read when they change (cert-manager rotates them
in place), so no restart is needed.

- Servers: `server_credentials` reloads its certificate on the next handshake after the files change
  (gRPC asks for the configuration on every new connection). With a client CA, clients must present
  a certificate it signed (mutual TLS): what the encoder and decoder require of the gateway.
- HTTP servers (the gateway's uvicorn): `ServerTls.ssl_context()` is an `ssl.SSLContext` that, on each
  new handshake, takes the files as they are now (a fresh context swapped in when they changed), with
  the same client-CA rule: with a client CA, no certificate from it, no connection.
- Clients: channel credentials are fixed when a channel is made, so `ClientTls.changed()` tells a
  pool when to make new channels (checked at most once a second).
Files caught half-rewritten (a key that does not match its certificate, a truncated PEM) are not
taken: the old ones stay in use and the files are looked at again on the next check.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass, field

import grpc

log = logging.getLogger("vlsplit.tls")
CHECK_EVERY_S = 1.0


def _read(path: str) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def _check(cert: str, key: str, ca: str) -> None:
    """Raise (OSError / ValueError) unless the files parse and the key belongs to the certificate: files
    caught half-rewritten are not taken, and are looked at again next time."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cert:
        context.load_cert_chain(cert, key)
    if ca:
        context.load_verify_locations(cafile=ca)


def _stamp(paths: tuple[str, ...]) -> tuple:
    """What changes when a file is rewritten or replaced (a renamed-in symlink included)."""
    out = []
    for path in paths:
        if path:
            try:
                st = os.stat(path)
                out.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((path, None))
    return tuple(out)


@dataclass(frozen=True)
class ServerTls:
    cert: str  # PEM certificate chain
    key: str  # PEM private key
    client_ca: str = ""  # PEM CA bundle: if set, clients must present a certificate it signed

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        _check(self.cert, self.key, self.client_ca)
        return grpc.ssl_server_certificate_configuration([(_read(self.key), _read(self.cert))],
                                                         root_certificates=_read(self.client_ca))

    def credentials(self) -> grpc.ServerCredentials:
        paths = (self.cert, self.key, self.client_ca)
        state = {"stamp": _stamp(paths)}
        lock = threading.Lock()

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            with lock:
                stamp = _stamp(paths)
                if stamp == state["stamp"]:
                    return None
                try:
                    configuration = self._configuration()
                except (OSError, ValueError) as exc:  # half-written files: keep serving the old ones
                    log.warning("TLS files changed but could not be read (%s); keeping the current ones", exc)
                    return None
                state["stamp"] = stamp
                log.info("TLS certificate reloaded", extra={"cert": self.cert})
                return configuration

        return grpc.dynamic_ssl_server_credentials(self._configuration(), fetch,
                                                   require_client_authentication=bool(self.client_ca))


    def ssl_context(self) -> ssl.SSLContext:
        """For an HTTP server: every handshake looks at the files first (a stat) and, when they changed
        and parse, switches to a context built from them, so rotated certificates (and CAs) reach new
        connections without a restart, as gRPC's `credentials` do."""
        paths = (self.cert, self.key, self.client_ca)
        state = {"stamp": _stamp(paths), "context": self._ssl_context()}
        lock = threading.Lock()

        def current(ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
            with lock:
                stamp = _stamp(paths)
                if stamp != state["stamp"]:
                    try:
                        state["context"], state["stamp"] = self._ssl_context(), stamp
                        log.info("TLS certificate reloaded (HTTP)", extra={"cert": self.cert})
                    except (OSError, ValueError) as exc:  # half-written files: keep the old ones, look again next time
                        log.warning("TLS files changed but could not be read (%s); keeping the current ones", exc)
                if state["context"] is not context:
                    ssl_object.context = state["context"]

        base = self._ssl_context()
        base.sni_callback = current  # OpenSSL calls it for every ClientHello, with or without SNI
        return base

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        if self.client_ca:
            context.load_verify_locations(cafile=self.client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


def server_tls(cert: str, key: str, client_ca: str = "") -> ServerTls | None:
    """ServerTls from config values, None for plaintext; a half-configured pair is an error."""
    if not (cert or key or client_ca):
        return None
    if not (cert and key):
        raise ValueError("TLS needs both a certificate and a key (VLSPLIT_TLS_CERT and VLSPLIT_TLS_KEY)")
    for path in (cert, key, client_ca):
        if path and not os.path.isfile(path):
            raise ValueError(f"TLS file not found: {path}")
    return ServerTls(cert, key, client_ca)


@dataclass
class ClientTls:
    ca: str  # PEM CA bundle that signed the servers' certificates
    cert: str = ""  # PEM client certificate chain (mutual TLS)
    key: str = ""
    server_name: str = ""  # the name the servers' certificates carry, when dialling them by IP
    _stamp: tuple = field(default=(), repr=False)
    _checked: float = field(default=0.0, repr=False)

    def __post_init__(self) -> None:
        self._stamp = _stamp((self.ca, self.cert, self.key))
        self._checked = time.monotonic()

    def credentials(self) -> grpc.ChannelCredentials:
        _check(self.cert, self.key, self.ca)
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca), private_key=_read(self.key),
                                            certificate_chain=_read(self.cert))

    def changed(self) -> bool:
        """True once after the files change (looked at no more than once a second)."""
        now = time.monotonic()
        if now - self._checked < CHECK_EVERY_S:
            return False
        self._checked = now
        stamp = _stamp((self.ca, self.cert, self.key))
        if stamp == self._stamp:
            return False
        try:
            _check(self.cert, self.key, self.ca)
        except (OSError, ValueError) as exc:
            log.warning("client TLS files changed but could not be read (%s); keeping the current ones", exc)
            return False
        self._stamp = stamp
        log.info("client TLS files changed: new connections use them", extra={"cert": self.cert})
        return True


def client_tls(ca: str, cert: str = "", key: str = "", server_name: str = "") -> ClientTls | None:
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ValueError("a client certificate needs its key (and the key its certificate)")
    for path in (ca, cert, key):
        if path and not os.path.isfile(path):
            raise ValueError(f"TLS file not found: {path}")
    return ClientTls(ca, cert, key, server_name)


def secure_channel(address: str, tls: ClientTls | None, options: list, name: str = "") -> grpc.aio.Channel:
    """An aio channel to `address`: plaintext without `tls`. `name` is the host the address was
    resolved from; the certificate is checked against `tls.server_name`, else `name`, else the host."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    override = tls.server_name or (name if name and not is_ip(name) else "")
    if override:
        options = [*options, ("grpc.ssl_target_name_override", override)]
    return grpc.aio.secure_channel(address, tls.credentials(), options=options)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
