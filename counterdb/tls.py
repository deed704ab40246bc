"""
TLS between nodes (and for clients): the node's certificate and key, and
the cluster's CA.

With them a node serves its API over TLS on ``--port`` (whatever endpoint
it is: the TLS layer wraps the site's factory) and talks to every peer over
``https://``, verifying the peer's certificate against the CA and the
actor's host name or IP address against the certificate. It presents its
own certificate as a client certificate; with ``require_client_cert`` it
refuses connections that do not present one from the CA (mutual TLS, as
etcd's peer port does).
"""

from __future__ import annotations

from pathlib import Path

import attrs
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate, optionsForClientTLS
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer


class TLSFileError(ValueError):
    """A certificate, key or CA file cannot be used; the message says why."""


@attrs.frozen(repr=False)
class TLSConfig:
    identity: PrivateCertificate  # this node's certificate and key
    ca: Certificate  # the cluster's CA: peers' certificates must come from it
    require_client_cert: bool = False

    def __repr__(self) -> str:
        return (
            f"<TLSConfig {self.identity.getSubject().commonName!r}, client certs required: {self.require_client_cert}>"
        )

    def server_options(self) -> CertificateOptions:
        require = self.require_client_cert
        return CertificateOptions(
            privateKey=self.identity.privateKey.original,
            certificate=self.identity.original,
            verify=require,
            caCerts=[self.ca.original] if require else None,
            requireCertificate=require,
        )

    def wrap(self, factory: Factory) -> TLSMemoryBIOFactory:
        """``factory``, served over TLS."""
        return TLSMemoryBIOFactory(self.server_options(), False, factory)

    def peer_policy(self) -> IPolicyForHTTPS:
        return _PeerPolicy(self)


@implementer(IPolicyForHTTPS)
class _PeerPolicy(BrowserLikePolicyForHTTPS):
    """Peers are verified against the cluster's CA only (not the system's
    roots), and this node shows its own certificate to them."""

    def __init__(self, tls: TLSConfig) -> None:
        super().__init__(trustRoot=tls.ca)
        self.tls = tls

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self.tls.ca, clientCertificate=self.tls.identity)


def load_tls(cert: str, key: str, ca: str, require_client_cert: bool = False) -> TLSConfig:
    """Read PEM files; raise :class:`TLSFileError` naming the file at fault."""
    cert_pem, key_pem, ca_pem = _read(cert, "certificate"), _read(key, "private key"), _read(ca, "CA certificate")
    try:
        authority = Certificate.loadPEM(ca_pem)
    except Exception as e:
        raise TLSFileError(f"{ca}: not a PEM CA certificate ({_reason(e)})") from None
    try:
        identity = PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
    except Exception as e:
        raise TLSFileError(f"{cert}, {key}: not a PEM certificate and its private key ({_reason(e)})") from None
    return TLSConfig(identity, authority, require_client_cert)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TLSFileError(f"{path}: cannot read the {what}: {e.strerror or e}") from None


def _reason(error: Exception) -> str:
    return str(error).splitlines()[0][:200] if str(error) else error.__class__.__name__
