"""Who is calling: a tenant from a bearer token or a client certificate.

Primitives: `Authenticator(tenants)`, `identify(context) -> tenant name | None`,
`tenant_of_token(token) -> tenant name | None`.

With no tenants configured the daemon runs open (`None`: callers name their own tenant;
the socket's permissions are the guard). Otherwise every call must prove a tenant: an
`authorization: Bearer <token>` header whose SHA-256 matches a configured hash, or, under
mutual TLS, a client certificate whose common name a tenant claims.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import grpc

from tierd.config import TenantConfig
from tierd.errors import Unauthenticated


class Authenticator:
    def __init__(self, tenants: Sequence[TenantConfig]) -> None:
        self._by_hash = {t.token_sha256: t.name for t in tenants if t.token_sha256}
        self._by_cn = {t.cert_cn: t.name for t in tenants if t.cert_cn}
        self.open = not tenants

    def identify(self, context: grpc.ServicerContext) -> str | None:
        if self.open:
            return None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                tenant = self.tenant_of_token(value[7:].strip())
                if tenant is not None:
                    return tenant
        auth = context.auth_context() or {}
        for cn in auth.get("x509_common_name", ()):
            tenant = self._by_cn.get(cn.decode(errors="replace"))
            if tenant is not None:
                return tenant
        raise Unauthenticated("a bearer token or client certificate of a tenant is required")

    def tenant_of_token(self, token: str) -> str | None:
        """The tenant whose token this is (None: no tenant's)."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
        found = None
        for known, tenant in self._by_hash.items():
            if hmac.compare_digest(known, digest):  # constant time per candidate
                found = tenant
        return found
