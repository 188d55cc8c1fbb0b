"""Key material and the node allow-list of a fedkt Flower deployment, written safely.

* **Private keys** are created with :func:`write_private` (``os.open(path, O_WRONLY|O_CREAT|O_EXCL,
  0o600)``): the file is never readable by others, not even for an instant, and an existing file is
  never overwritten (``force=True`` removes it first, on request by name: ``--force``).
* **TLS** (:func:`make_certs`): a local CA and a server certificate for the given host names/IPs.
  The CA's private key goes to ``DIR/ca/ca.key`` (a 0700 directory that nothing is ever copied from);
  what is handed out to the client organisations is only ``DIR/ca.pem``. ``server.pem`` and
  ``server.key`` stay on the SuperLink's machine. The lifetime is a setting (``days``).
* **SuperNode keys** (:func:`make_node_key`): an EC key pair (NIST P-384, OpenSSH format), the private
  half 0600, the public half ``PATH.pub`` sent to the server operator.
* **Allow-list** (:class:`AllowList`, ``nodes.toml`` on the SuperLink's machine): client id -> the
  node's public key and the node id the SuperLink gave that key at registration. It is the identity
  of a client: a SuperNode serves client ``cid`` only if it authenticated with ``cid``'s key.

This module imports nothing from ``flwr``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w


class CredentialError(RuntimeError):
    """A key/certificate/allow-list file that cannot be written or read as asked."""


def write_private(path: str | Path, data: bytes, force: bool = False) -> Path:
    """Create ``path`` with mode 0600 and write ``data``, atomically with respect to permissions: the file
    is created by ``open(O_CREAT|O_EXCL, 0o600)``, so it is never world-readable and an existing file (or a
    planted symlink) makes this fail instead of being overwritten, unless ``force``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if force and (p.exists() or p.is_symlink()):
        p.unlink()
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    except FileExistsError:
        raise CredentialError(f"{p} already exists: refusing to overwrite a key (pass --force to replace it, "
                              "after making sure nothing still uses it)") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return p


def write_public(path: str | Path, data: bytes, force: bool = False) -> Path:
    """Write a public file (certificate, public key): mode 0644, no silent overwrite either."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists() and not force:
        raise CredentialError(f"{p} already exists: refusing to overwrite it (pass --force to replace it)")
    if force and (p.exists() or p.is_symlink()):
        p.unlink()
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return p


def make_certs(directory: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 30,
               force: bool = False) -> dict[str, Path]:
    """A local CA and a server certificate for ``hosts`` signed by it, valid for ``days`` days.

    The certificate is also valid for 127.0.0.1 and localhost (the SuperLink's operator listener).
    Writes ``ca.pem`` (hand this one to the clients), ``server.pem``, ``server.key`` (0600) and
    ``ca/ca.key`` (0600, in a 0700 directory: it signs certificates, keep it off the network)."""
    from cryptography import x509  # deferred: cryptography comes with the [flower] extra (flwr's dependency)
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if days <= 0:
        raise CredentialError(f"certificate lifetime must be at least 1 day, got days={days}")
    if not hosts:
        raise CredentialError("make_certs needs at least one host name or IP for the server certificate")
    # the operator listener (Control + Runtime API, where the SuperExec and ServerApps connect) is 127.0.0.1
    hosts = tuple(hosts) + tuple(h for h in ("127.0.0.1", "localhost") if h not in hosts)
    d = Path(directory)
    paths = {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key", "ca_key": d / "ca" / "ca.key"}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise CredentialError(f"{', '.join(existing)} already exist: refusing to overwrite certificates and "
                              "keys (pass --force to replace them; every client then needs the new ca.pem)")
    d.mkdir(parents=True, exist_ok=True)
    (d / "ca").mkdir(mode=0o700, exist_ok=True)
    os.chmod(d / "ca", 0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    until = now + datetime.timedelta(days=days)

    def name(cn: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(name("fedkt local CA")).issuer_name(name("fedkt local CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    alt: list[x509.GeneralName] = []
    for h in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv = (x509.CertificateBuilder().subject_name(name(hosts[0])).issuer_name(ca.subject)
           .public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(now).not_valid_after(until)
           .add_extension(x509.SubjectAlternativeName(alt), critical=False)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM

    def priv(k) -> bytes:
        return k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    write_private(paths["ca_key"], priv(ca_key), force)
    write_private(paths["key"], priv(srv_key), force)
    write_public(paths["ca"], ca.public_bytes(pem), force)
    write_public(paths["cert"], srv.public_bytes(pem), force)
    return paths


def make_node_key(path: str | Path, force: bool = False) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair: ``path`` (private, OpenSSH, 0600) and ``path.pub``."""
    from cryptography.hazmat.primitives import serialization  # deferred: cryptography comes with the [flower] extra
    from cryptography.hazmat.primitives.asymmetric import ec

    priv = Path(path)
    pub = priv.with_name(priv.name + ".pub")
    if pub.exists() and not force:
        raise CredentialError(f"{pub} already exists: refusing to overwrite a node key (pass --force)")
    k = ec.generate_private_key(ec.SECP384R1())
    write_private(priv, k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                        serialization.NoEncryption()), force)
    write_public(pub, k.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
                 + b" fedkt-node\n", force)
    return priv, pub


def public_key_text(path: str | Path) -> str:
    """``ecdsa-sha2-nistp384 AAAA...`` of an OpenSSH public key file (the comment dropped); checked."""
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key  # deferred: [flower] extra

    p = Path(path)
    try:
        parts = p.read_text(encoding="ascii").split()
        load_ssh_public_key(" ".join(parts[:2]).encode("ascii"))
    except (OSError, ValueError, UnicodeError, IndexError) as e:
        raise CredentialError(f"{p} is not an OpenSSH public key ({e}); send the .pub file written by "
                              "`fedkt flower make-node-key`") from e
    return " ".join(parts[:2])


@dataclass
class AllowList:
    """``client id -> (public key, node id)``, kept in a TOML file on the SuperLink's machine."""

    path: Path
    nodes: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, must_exist: bool = False) -> "AllowList":
        p = Path(path)
        if not p.is_file():
            if must_exist:
                raise CredentialError(f"node allow-list {p} does not exist: register each client's SuperNode "
                                      "first (`fedkt flower register-node --cid CID CLIENT.pub`)")
            return cls(p)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8")).get("nodes", {})
        except tomllib.TOMLDecodeError as e:
            raise CredentialError(f"node allow-list {p} is not valid TOML: {e}") from e
        for cid, entry in data.items():
            if not (isinstance(entry, dict) and isinstance(entry.get("public_key"), str)
                    and isinstance(entry.get("node_id"), str) and entry["node_id"].isdigit()):
                raise CredentialError(f"node allow-list {p}: entry {cid!r} needs public_key and node_id "
                                      "(strings; node_id in decimal digits: Flower node ids are 64-bit unsigned)")
        return cls(p, dict(data))

    def add(self, cid: str, public_key: str, node_id: int, force: bool = False) -> None:
        old = self.nodes.get(cid)
        if old is not None and old["public_key"] != public_key and not force:
            raise CredentialError(f"client {cid!r} is already registered with another key in {self.path}: "
                                  "pass --force to replace it (the old node is then refused)")
        for other, entry in self.nodes.items():
            if other != cid and entry["public_key"] == public_key:
                raise CredentialError(f"this key is already registered for client {other!r} in {self.path}: "
                                      "each client organisation needs its own node key")
        self.nodes[cid] = {"public_key": public_key, "node_id": str(int(node_id))}

    def node_ids(self) -> dict[str, int]:
        return {cid: int(e["node_id"]) for cid, e in self.nodes.items()}

    def save(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        write_private(tmp, tomli_w.dumps({"nodes": self.nodes}).encode("utf-8"))
        os.replace(tmp, self.path)
        return self.path
