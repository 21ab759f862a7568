"""Talking to OCI registries: references, registries.conf, credentials and the client.

``client.RegistryClient`` is the facade; beneath it ``transport`` (pools, scheme, retries,
redirects, bounded reads), ``tokens`` (challenges, bearer tokens), ``session`` (endpoints,
authenticated requests, errors, paging) and the API modules ``manifests``, ``blobs``,
``uploads`` and ``referrers``; ``auth`` reads credentials, ``config`` registries.conf,
``hosts`` containerd's hosts.toml and the certs.d directories.

>>> from soci.registry import Reference, RegistryClient
>>> ref = Reference.parse("alpine")            # docker.io/library/alpine:latest
>>> with RegistryClient() as client:           # doctest: +SKIP
...     manifest = client.get_manifest(ref)    # verified bytes, media type, digest
"""

from soci.registry.auth import Credentials, CredentialStore, default_auth_files
from soci.registry.client import (
    DEFAULT_ACCEPT,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    BlobReader,
    Challenge,
    Descriptor,
    Manifest,
    PushedManifest,
    RegistryClient,
    digest_of,
    parse_www_authenticate,
    referrers_tag,
)
from soci.registry.config import (
    Endpoint,
    Mirror,
    RegistriesConf,
    RegistriesConfError,
    RegistryEntry,
    default_registries_conf_path,
)
from soci.registry.hosts import HostsConfigError, RegistryHosts, TLSConfig
from soci.registry.reference import DOCKER_HUB, Reference, validate_digest
from soci.registry.transport import RetryNotice

__all__ = [
    "DEFAULT_ACCEPT",
    "DOCKER_HUB",
    "DOCKER_MANIFEST",
    "DOCKER_MANIFEST_LIST",
    "OCI_INDEX",
    "OCI_MANIFEST",
    "BlobReader",
    "Challenge",
    "CredentialStore",
    "Credentials",
    "Descriptor",
    "Endpoint",
    "HostsConfigError",
    "Manifest",
    "Mirror",
    "PushedManifest",
    "Reference",
    "RegistriesConf",
    "RegistriesConfError",
    "RegistryClient",
    "RegistryEntry",
    "RegistryHosts",
    "RetryNotice",
    "TLSConfig",
    "default_auth_files",
    "default_registries_conf_path",
    "digest_of",
    "parse_www_authenticate",
    "referrers_tag",
    "validate_digest",
]
