"""TLS options of `prefork serve` (uvicorn's --ssl-*, gunicorn's --ca-certs, --cert-reqs, --ciphers):
their converters, and the check the primary makes before any worker starts, with the same context
uvicorn builds (uvicorn/config.py create_ssl_context), so a bad file, password or cipher list is one
line, not a boot error per worker."""

from __future__ import annotations

import os
from typing import Any

from .config import UsageError

CERT_REQS = {"none": 0, "optional": 1, "required": 2}  # ssl.CERT_NONE, CERT_OPTIONAL, CERT_REQUIRED
# ssl.PROTOCOL_*: TLS (negotiated), TLS_SERVER (uvicorn's default), and the old pinned versions
SSL_VERSIONS = {"tls": 2, "tls_server": 17, "tlsv1": 3, "tlsv1_1": 4, "tlsv1_2": 5}


def to_cert_reqs(value: Any) -> int:
    """none|optional|required, or 0|1|2 as uvicorn and gunicorn spell them."""
    text = str(value).strip().lower()
    if text in CERT_REQS:
        return CERT_REQS[text]
    if text in ("0", "1", "2"):
        return int(text)
    raise ValueError(f"expected none, optional, required (or 0, 1, 2), not {value!r}")


def to_ssl_version(value: Any) -> int:
    text = str(value).strip().lower()
    if text in SSL_VERSIONS:
        return SSL_VERSIONS[text]
    if text.isdigit() and int(text) in SSL_VERSIONS.values():
        return int(text)
    raise ValueError(f"expected one of {', '.join(SSL_VERSIONS)} (or their ssl.PROTOCOL_ numbers "
                     f"{', '.join(str(n) for n in sorted(SSL_VERSIONS.values()))}), not {value!r}")


class TLSError(Exception):
    """A TLS file or setting that cannot be used: one line, exit code 1 (serve.py's CommandError)."""


def check_tls(opts: dict[str, Any]) -> None:
    certfile, keyfile = opts.get("certfile"), opts.get("keyfile")
    if keyfile and not certfile:
        raise UsageError("--keyfile needs --certfile")
    if not certfile:
        for name in ("ssl_keyfile_password", "ssl_ca_certs"):
            if opts.get(name):
                raise UsageError(f"--{name.replace('_', '-')} needs --certfile")
        return
    files = (("--certfile", certfile), ("--keyfile", keyfile), ("--ssl-ca-certs", opts.get("ssl_ca_certs")))
    for flag, path in files:
        if path and not os.path.isfile(path):
            raise TLSError(f"{flag} {path}: no such file")
    import ssl  # here, not at the top: the primary of a server without TLS stays small

    try:
        context = ssl.SSLContext(opts.get("ssl_version") or ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile, opts.get("ssl_keyfile_password"))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TLSError(f"cannot load the TLS certificate/key ({certfile}, {keyfile}): {exc}") from None
    try:
        context.verify_mode = ssl.VerifyMode(opts.get("ssl_cert_reqs") or 0)
        if opts.get("ssl_ca_certs"):
            context.load_verify_locations(opts["ssl_ca_certs"])
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TLSError(f"--ssl-ca-certs {opts.get('ssl_ca_certs')}: {exc}") from None
    if context.verify_mode == ssl.CERT_REQUIRED and not opts.get("ssl_ca_certs"):
        raise UsageError("--ssl-cert-reqs required needs --ssl-ca-certs (the CAs client certificates are "
                         "checked against)")
    ciphers = opts.get("ssl_ciphers")
    if ciphers:
        try:
            context.set_ciphers(ciphers)
        except ssl.SSLError:
            raise TLSError(f"--ssl-ciphers {ciphers!r}: no cipher of this list is available "
                           "(an OpenSSL cipher list, e.g. TLSv1.2 or ECDHE+AESGCM)") from None
