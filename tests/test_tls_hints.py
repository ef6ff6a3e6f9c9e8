"""The hint for a certificate that fails verification, judged on OpenSSL's real messages."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest

from fleetlite.sdk.tls_hints import is_strict_x509_failure, verify_failure_hint
from tests.pki import Issued, TestPki


def verify_message(server: Issued, ca: Path, *, strict: bool) -> str:
    """OpenSSL's verify message for a TLS client (with or without strict checks, as Python
    3.13+ has them by default) connecting to a real TLS server presenting ``server``."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(server.cert, server.key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            server_context.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = ssl.create_default_context(cafile=str(ca))
    if strict:
        client.verify_flags |= ssl.VERIFY_X509_STRICT
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                pytest.raises(ssl.SSLCertVerificationError) as failure:
            client.wrap_socket(raw, server_hostname="localhost")
    finally:
        thread.join(10)
        listener.close()
    return str(failure.value.verify_message)


def test_a_certificate_refused_only_by_strict_checks_gets_the_reissue_hint(
        tmp_path: Path) -> None:
    pki = TestPki(tmp_path / "pki")
    old_style = pki.issue("localhost", server=True, rfc5280=False)
    message = verify_message(old_style, pki.ca, strict=True)
    assert is_strict_x509_failure(message), message
    hint = verify_failure_hint(message, "broker.tls.ca")
    assert "Python 3.13+" in hint and "authorityKeyIdentifier" in hint
    # the CA file is right: the hint must not send the operator to it
    assert "broker.tls.ca" not in hint


def test_a_certificate_from_another_ca_gets_the_ca_file_hint(tmp_path: Path) -> None:
    pki, other = TestPki(tmp_path / "pki"), TestPki(tmp_path / "other")
    message = verify_message(pki.issue("localhost", server=True), other.ca, strict=True)
    assert not is_strict_x509_failure(message), message
    assert verify_failure_hint(message, "--tls-ca").startswith("point --tls-ca at the CA")
