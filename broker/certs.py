"""A small certificate authority for one fleet, through the ``openssl`` command.

Python's standard library cannot create certificates, and the ``openssl`` command is on
every Raspberry Pi OS and Debian system, so this needs no new dependency. Keys are ECDSA
P-256 (fast to use on a Pi, small). Commands are those of OpenSSL 1.1.1 and 3.x:
``req -new`` for a request, ``x509 -req`` to sign it with explicit extensions (the CA
keeps no serial or index files). Extensions include the key identifiers that strict
verifiers (Python 3.13's default ``VERIFY_X509_STRICT``) ask for.
"""

import ipaddress
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

CA_DAYS = 3650
LEAF_DAYS = 825


def _openssl(*args: str) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError("the openssl command is not installed: apt-get install -y openssl")
    result = subprocess.run(
        [binary, *args], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()[-500:]}")


def _new_key(path: Path) -> None:
    _openssl(
        "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)
    )
    path.chmod(0o600)


def subject_alt_names(hostnames: list[str]) -> str:
    """``DNS:name`` or ``IP:address`` for each name, as one subjectAltName value."""
    names = []
    for name in hostnames:
        try:
            names.append(f"IP:{ipaddress.ip_address(name)}")
        except ValueError:
            if not name or any(c in name for c in ", \n\r\t:/"):
                raise ValueError(f"{name!r} is neither a host name nor an IP address") from None
            names.append(f"DNS:{name}")
    return ",".join(names)


def make_ca(cert: Path, key: Path, *, name: str) -> None:
    """A self-signed CA (may sign leaf certificates only) at ``cert``/``key``."""
    cert.parent.mkdir(parents=True, exist_ok=True)
    _new_key(key)
    _openssl(
        "req", "-new", "-x509", "-sha256", "-days", str(CA_DAYS),
        "-key", str(key), "-out", str(cert), "-subj", f"/O=fedmq/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )  # fmt: skip
    cert.chmod(0o644)  # openssl creates it under the umask


def make_leaf(
    cert: Path,
    key: Path,
    *,
    ca_cert: Path,
    ca_key: Path,
    common_name: str,
    server_names: list[str] | None = None,
) -> None:
    """A key and a certificate signed by the CA: a server certificate for
    ``server_names`` (subjectAltName), else a client certificate with CN ``common_name``."""
    cert.parent.mkdir(parents=True, exist_ok=True)
    _new_key(key)
    usage = "serverAuth" if server_names else "clientAuth"
    extensions = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",
        f"extendedKeyUsage={usage}",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid",
    ]
    if server_names:
        extensions.append(f"subjectAltName={subject_alt_names(server_names)}")
    with tempfile.TemporaryDirectory(prefix="fedmq-certs-") as work:
        request = Path(work) / "leaf.csr"
        config = Path(work) / "leaf.ext"
        config.write_text("[leaf]\n" + "\n".join(extensions) + "\n")
        _openssl(
            "req", "-new", "-key", str(key), "-out", str(request),
            "-subj", f"/O=fedmq/CN={common_name}",
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-sha256", "-in", str(request), "-days", str(LEAF_DAYS),
            "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-set_serial", f"0x{secrets.token_hex(16)}",
            "-extfile", str(config), "-extensions", "leaf", "-out", str(cert),
        )  # fmt: skip
    cert.chmod(0o644)  # openssl creates it under the umask
