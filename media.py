"""Where a server request's image comes from: a `data:` URI always; an `https://` URL only from the hosts the user
allowed (--allowed_media_domains); a `file://` URL only under the folder the user allowed
(--allowed_local_media_path). Anything else is refused with a MediaError that says why.

Fetching is guarded as vLLM learned to guard it: https only; the host's every address must be a public one (no
private, loopback, link-local or reserved address) and the connection goes to the address that was checked, so a
second DNS answer cannot point it elsewhere; a redirect is followed only to the same host; connect and read
timeouts; at most max_bytes read.
"""

import base64
import binascii
import http.client
import ipaddress
import os
import socket
import ssl
import urllib.parse
from pathlib import Path

TIMEOUT_S = 10
MAX_REDIRECTS = 3


class MediaError(Exception):
    """The image URL is refused or cannot be read; the message says why."""


def read_media(url: str, *, max_bytes: int, domains: frozenset[str] = frozenset(),
               local_root: Path | None = None) -> bytes:
    """The bytes an image URL names, by the rules above."""
    if not isinstance(url, str) or not url:
        raise MediaError("image_url.url must be a non-empty string")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return read_data_uri(url, max_bytes)
    if scheme == "https" and domains:
        return fetch(url, domains, max_bytes)
    if scheme == "file" and local_root is not None:
        return read_local(url, local_root, max_bytes)
    allowed = ["data: URIs"] + (["https:// URLs from --allowed_media_domains"] if domains else []) + (
        ["file:// URLs under --allowed_local_media_path"] if local_root is not None else [])
    raise MediaError(f"image URLs of the kind {url[:40]!r} are not allowed here; this server takes "
                     + ", ".join(allowed))


def read_data_uri(url: str, max_bytes: int) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise MediaError("a data: URI must be data:<type>;base64,<data>")
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise MediaError(f"the image is over {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data: URI is not valid base64") from None


def read_local(url: str, root: Path, max_bytes: int) -> bytes:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError("a file:// URL must name a file on this machine")
    path = Path(os.path.realpath(urllib.parse.unquote(parts.path)))
    if not path.is_relative_to(os.path.realpath(root)):
        raise MediaError(f"{url[:80]} is outside --allowed_local_media_path")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise MediaError(f"{url[:80]}: cannot be read ({e.strerror})") from None
    if len(data) > max_bytes:
        raise MediaError(f"{url[:80]} is over {max_bytes} bytes")
    return data


def public_address(host: str, port: int) -> str:
    """An address of host that is public; MediaError if any of its addresses is not (private, loopback, ...)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise MediaError(f"the image's host {host} cannot be resolved") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        if not ipaddress.ip_address(address.split("%")[0]).is_global:
            raise MediaError(f"the image's host {host} resolves to {address}, which is not a public address")
    return addresses[0]


class PinnedHTTPS(http.client.HTTPSConnection):
    """An HTTPS connection to one checked address, with the certificate checked for the host's name."""

    def __init__(self, host: str, address: str, port: int):
        super().__init__(host, port, timeout=TIMEOUT_S, context=ssl.create_default_context())
        self.address = address

    def connect(self):
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch(url: str, domains: frozenset[str], max_bytes: int) -> bytes:
    host = None
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() != "https" or not parts.hostname:
            raise MediaError("image URLs must be https://")
        if host is not None and parts.hostname != host:
            raise MediaError(f"the image's URL redirects to another host, {parts.hostname}")
        host = parts.hostname.lower()
        if host not in domains:
            raise MediaError(f"the image's host {host} is not in --allowed_media_domains")
        port = parts.port or 443
        connection = PinnedHTTPS(host, public_address(host, port), port)
        try:
            connection.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")))
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                continue
            if response.status != 200:
                raise MediaError(f"fetching the image got HTTP {response.status}")
            data = response.read(max_bytes + 1)
        except (OSError, http.client.HTTPException) as e:
            raise MediaError(f"fetching the image failed ({type(e).__name__})") from None
        finally:
            connection.close()
        if len(data) > max_bytes:
            raise MediaError(f"the image is over {max_bytes} bytes")
        return data
    raise MediaError("the image's URL redirects too many times")
