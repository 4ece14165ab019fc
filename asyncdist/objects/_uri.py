"""Object URIs: ``adist:ID@HOST:PORT``, ``adistname:NAME[@NSHOST:NSPORT]``, ``adistmeta:TAGS``.

========================================  =============================================
``adist:OBJECTID@HOST:PORT``              an object in the daemon at HOST:PORT
``adist:OBJECTID@[::1]:PORT``             the same, IPv6
``adist:OBJECTID@./u:/path/to/socket``    a daemon on a Unix socket
``adistname:NAME``                        the object registered as NAME in the name server
``adistname:NAME@NSHOST:NSPORT``          ... in the name server at NSHOST:NSPORT
``adistmeta:TAG1,TAG2[@NSHOST:NSPORT]``   any object registered with all these metadata tags
========================================  =============================================

The scheme is case-insensitive. Object ids are 1 to 128 characters of
letters, digits, ``_``, ``-`` and ``.``; names are 1 to 1024 printable
characters without ``@`` or whitespace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

__all__ = ["URI", "MAX_NAME", "check_name", "check_object_id"]

MAX_NAME: Final = 1024
MAX_OBJECT_ID: Final = 128
_OBJECT_ID: Final = re.compile(r"[A-Za-z0-9_.\-]{1,128}\Z")
_SCHEMES: Final = ("adist", "adistname", "adistmeta")

Scheme = Literal["adist", "adistname", "adistmeta"]


def check_object_id(object_id: str) -> str:
    """Return ``object_id`` if it is a valid object id, else raise :class:`ValueError`."""
    if type(object_id) is not str or not _OBJECT_ID.match(object_id):
        raise ValueError(f"bad object id {str(object_id)[:64]!r}: 1-128 letters, digits, '_', '-' or '.'")
    return object_id


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid registration name, else raise :class:`ValueError`."""
    if type(name) is not str or not 0 < len(name) <= MAX_NAME:
        raise ValueError(f"a name must be a string of 1 to {MAX_NAME} characters")
    if "@" in name or not name.isprintable() or any(c.isspace() for c in name):
        raise ValueError(f"bad name {name[:64]!r}: no '@', whitespace or control characters")
    return name


@dataclass(frozen=True, slots=True)
class URI:
    """A parsed object URI; ``str(uri)`` gives its text back."""

    scheme: Scheme
    #: The object id (``adist``), the name (``adistname``) or the comma-separated tags (``adistmeta``).
    object: str
    host: str | None = None
    port: int | None = None
    #: Unix socket path of the daemon (``adist:ID@./u:PATH``), instead of host and port.
    path: str | None = None

    @classmethod
    def parse(cls, text: str | URI) -> URI:
        """Parse a URI; raise :class:`ValueError` with the reason when it is malformed."""
        if isinstance(text, URI):
            return text
        if type(text) is not str or len(text) > 4096:
            raise ValueError("a URI must be a string of at most 4096 characters")
        scheme, sep, rest = text.partition(":")
        scheme = scheme.lower()
        if not sep or scheme not in _SCHEMES:
            raise ValueError(f"bad URI {text[:80]!r}: expected adist:, adistname: or adistmeta:")
        obj, at, location = rest.partition("@")
        host: str | None = None
        port: int | None = None
        path: str | None = None
        if at:
            if location.startswith("./u:"):
                path = location[4:]
                if not path:
                    raise ValueError(f"bad URI {text[:80]!r}: empty socket path")
            else:
                host, port = _split_location(location, text)
        elif scheme == "adist":
            raise ValueError(f"bad URI {text[:80]!r}: adist: needs a location, adist:ID@HOST:PORT")
        if scheme == "adist":
            check_object_id(obj)
        elif scheme == "adistname":
            check_name(obj)
        else:
            tags = [t for t in obj.split(",") if t]
            if not tags:
                raise ValueError(f"bad URI {text[:80]!r}: adistmeta: needs at least one tag")
        if path is not None and scheme != "adist":
            raise ValueError(f"bad URI {text[:80]!r}: a name server is reached by host and port")
        return cls(scheme, obj, host, port, path)  # type: ignore[arg-type]

    @property
    def location(self) -> str | None:
        """``HOST:PORT`` (``[::1]:PORT`` for IPv6), ``./u:PATH``, or None."""
        if self.path is not None:
            return f"./u:{self.path}"
        if self.host is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def tags(self) -> frozenset[str]:
        """The metadata tags of an ``adistmeta:`` URI."""
        return frozenset(t for t in self.object.split(",") if t)

    def __str__(self) -> str:
        location = self.location
        return f"{self.scheme}:{self.object}" + (f"@{location}" if location else "")


def _split_location(location: str, text: str) -> tuple[str, int]:
    if location.startswith("["):
        host, close, rest = location[1:].partition("]")
        if not close or not rest.startswith(":"):
            raise ValueError(f"bad URI {text[:80]!r}: IPv6 locations are [ADDRESS]:PORT")
        port_text = rest[1:]
    else:
        host, colon, port_text = location.rpartition(":")
        if not colon or ":" in host:
            raise ValueError(f"bad URI {text[:80]!r}: the location must be HOST:PORT")
    if not host:
        raise ValueError(f"bad URI {text[:80]!r}: empty host")
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ValueError(f"bad URI {text[:80]!r}: bad port {port_text[:16]!r}")
    return host, int(port_text)
