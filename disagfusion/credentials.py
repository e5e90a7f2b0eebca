"""Credentials of the NATS and Redis users (roles in ``disagfusion.auth``): where they come from,
how they ride in a URL, and the production rule that refuses known or empty ones.

A service finds its credentials in its settings (``DF_NATS_USER``/``DF_NATS_PASSWORD``, or
``DF_NATS_PASSWORD_FILE`` for a mounted secret; the same for Redis) or in the URL itself
(``nats://user:password@host:4222``). Settings are folded into the URL, so every connection
made from ``settings.nats_url`` carries them. The embedded stack generates a password per role
into its data directory on first ``up`` (``credentials.json``, mode 0600).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from disagfusion.errors import DisagFusionError

CREDENTIALS_FILE = "credentials.json"
PRODUCTION = "production"
"""``DF_ENV=production``: refuse to start without credentials of one's own."""
DEVELOPMENT_PREFIX = "df-dev-"
"""compose.yaml's fallback passwords (``df-dev-<role>``) when none are given: known to everyone,
so refused in production."""
MIN_PRODUCTION_PASSWORD = 16
_PASSWORD = re.compile(r"[A-Za-z0-9._~-]+")
"""Characters that travel in a URL unescaped (nats-py does not unescape what a URL carries)."""


class CredentialsError(DisagFusionError, ValueError):
    """Missing, malformed or (in production) default credentials."""


TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
"""A tenant's name: its NATS user, the qualifier of its job ids and a token of its subjects
(docs/security.md "Tenants")."""


def check_tenant_format(tenant: str) -> str:
    """``tenant`` if it is spelled as a tenant's name (``TENANT_NAME``), else ValueError."""
    if not TENANT_NAME.match(tenant):
        raise ValueError(f"{tenant!r} is not a tenant name: 1-32 of a-z, 0-9, '_', '-', starting with a letter or digit")
    return tenant


def production() -> bool:
    return os.environ.get("DF_ENV", "").strip().lower() == PRODUCTION


def generate_password() -> str:
    """32 URL-safe characters (192 bits) that never start with ``-``, which command lines and
    nats-server's config parser would take for something else."""
    while (password := secrets.token_urlsafe(24)).startswith("-"):
        pass
    return password


def stack_credentials(data_dir: Path, roles: Iterable[str]) -> dict[str, str]:
    """Role (or tenant) -> password of the embedded stack in ``data_dir``, each generated on
    first use and kept in ``credentials.json`` (mode 0600; delete it and restart the stack to
    rotate them all)."""
    path = data_dir / CREDENTIALS_FILE
    saved = json.loads(path.read_text()) if path.exists() else {}
    missing = [role for role in roles if role not in saved]
    if not missing:
        return saved
    passwords = saved | {role: generate_password() for role in missing}
    write_private(path, json.dumps(passwords, indent=2))
    return passwords


def write_private(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, readable by this user only (never through a symlink)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.replace(tmp, path)


def read_secret(value: str, file: Path | None, what: str) -> str:
    """``value``, or the contents of ``file`` (a compose or Kubernetes secret) when given."""
    if file is None:
        return value
    try:
        return file.read_text().strip()
    except OSError as exc:
        raise CredentialsError(f"cannot read {what} from {file}: {exc.strerror}") from None


def with_credentials(urls: str, user: str, password: str, what: str) -> str:
    """``urls`` (one URL or a comma-separated list) with ``user:password@`` in each that has no
    credentials of its own; production refuses a URL left without a password, or with a default one."""
    out = []
    for url in (u.strip() for u in urls.split(",") if u.strip()):
        parts = urlsplit(url)
        if user and password and not parts.password:
            if not _PASSWORD.fullmatch(password) or not _PASSWORD.fullmatch(user):
                raise CredentialsError(f"{what} user and password may hold only letters, digits and . _ ~ -")
            parts = parts._replace(netloc=f"{user}:{password}@{parts.netloc.rpartition('@')[2]}")
            url = urlunsplit(parts)
        if production():
            check_production_password(parts.password, what)
        out.append(url)
    return ",".join(out)


def check_production_password(password: str | None, what: str) -> None:
    if not password:
        raise CredentialsError(f"DF_ENV=production: {what} has no password (docs/security.md says how to set one)")
    if password.startswith(DEVELOPMENT_PREFIX) or len(password) < MIN_PRODUCTION_PASSWORD:
        raise CredentialsError(f"DF_ENV=production: {what} uses a default or short password "
                               f"(at least {MIN_PRODUCTION_PASSWORD} characters; docs/security.md)")


def redact(urls: str) -> str:
    """``urls`` with every password replaced by ``***``, for logs and status output."""
    return ",".join(_redact_one(u) for u in urls.split(","))


def _redact_one(url: str) -> str:
    parts = urlsplit(url.strip())
    if not parts.password:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}"))
