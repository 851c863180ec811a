"""TLS flags of `prefork serve` (src/prefork/cli/tls.py): an encrypted key, client certificates, a
cipher list; each bad one is one line before any worker starts. Real handshakes with `ssl`."""

from __future__ import annotations

import socket
import ssl
import subprocess
from pathlib import Path

import pytest
from cli_helpers import free_port, prefork_cmd, run_prefork  # noqa: F401

APP = "tests.apps.hello:asgi"
pytestmark = pytest.mark.timeout(60)


def _cert(folder: Path, password: str | None = None) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    secret = ["-passout", f"pass:{password}"] if password else ["-nodes"]
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", *secret, "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    return cert, key


def _serve(prefork_cmd, tmp_path: Path, *extra: str) -> int:  # noqa: F811
    port = free_port()
    cmd = prefork_cmd("serve", APP, "--workers", "1", "--bind", f"127.0.0.1:{port}", "--control",
                      str(tmp_path / "ctl.sock"), *extra)
    cmd.wait_ready(30)
    return port


def _get(port: int, client: tuple[Path, Path] | None = None) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    if client is not None:
        context.load_cert_chain(*client)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_encrypted_key_with_its_password(prefork_cmd, tmp_path):  # noqa: F811
    cert, key = _cert(tmp_path, "s3cret")
    port = _serve(prefork_cmd, tmp_path, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                  "--ssl-keyfile-password", "s3cret")
    assert _get(port).startswith(b"HTTP/1.1 200 ")


def test_wrong_password_is_one_line(tmp_path):
    cert, key = _cert(tmp_path, "s3cret")
    result = run_prefork(["serve", APP, "--certfile", str(cert), "--keyfile", str(key),
                          "--ssl-keyfile-password", "nope"])
    assert result.returncode == 1, result
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot load the TLS" in result.stderr, result.stderr


def test_required_client_certificates(prefork_cmd, tmp_path):  # noqa: F811
    cert, key = _cert(tmp_path)
    port = _serve(prefork_cmd, tmp_path, "--certfile", str(cert), "--keyfile", str(key), "--cert-reqs",
                  "required", "--ca-certs", str(cert), "--ciphers", "ECDHE+AESGCM")
    assert _get(port, client=(cert, key)).startswith(b"HTTP/1.1 200 ")
    try:  # no client certificate: the handshake fails (TLS 1.3: the server's alert ends the first read)
        reply = _get(port)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        reply = b""
    assert reply == b"", reply


@pytest.mark.parametrize(("args", "words", "code"), [
    (["--cert-reqs", "maybe"], "none, optional, required", 2),
    (["--ssl-version", "sslv3"], "tls_server", 2),
    (["--ssl-cert-reqs", "required"], "needs --ssl-ca-certs", 2),
    (["--ciphers", "NOTACIPHER"], "no cipher of this list", 1),
    (["--ssl-ca-certs", "/no/such.pem"], "no such file", 1),
])
def test_bad_tls_settings_are_one_line(tmp_path, args, words, code):
    cert, key = _cert(tmp_path)
    result = run_prefork(["serve", APP, "--certfile", str(cert), "--keyfile", str(key), *args])
    assert result.returncode == code, result
    assert len(result.stderr.strip().splitlines()) == 1 and words in result.stderr, result.stderr
