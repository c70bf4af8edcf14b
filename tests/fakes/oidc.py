"""A fake of the Kubernetes API server's OIDC key endpoint (``/openid/v1/jwks``), test code only.

It serves a JSON Web Key Set over real HTTP on loopback, the same shape the API server does
(``{"keys": [{"kty": "RSA", "kid", "use": "sig", "alg": "RS256", "n", "e"}]}``), counts fetches,
and can rotate keys, so the router's JWKS cache is tested against the wire format it meets in
a cluster. It also mints service-account tokens with the claims Kubernetes puts in them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclasses.dataclass
class SigningKey:
    kid: str
    private: rsa.RSAPrivateKey

    def jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return jwk


def new_key(kid: str) -> SigningKey:
    return SigningKey(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048))


class FakeOidc:
    def __init__(self) -> None:
        self.keys: list[SigningKey] = [new_key("k8s-key-1")]
        self.fetches = 0
        self.down = False  # answer 503, as an API server that is restarting does
        self.auth_headers: list[str | None] = []
        self.app = Starlette(routes=[Route("/openid/v1/jwks", self._jwks)])

    async def _jwks(self, request: Request) -> JSONResponse:
        self.fetches += 1
        self.auth_headers.append(request.headers.get("authorization"))
        if self.down:
            return JSONResponse({"message": "unavailable"}, status_code=503)
        return JSONResponse({"keys": [k.jwk() for k in self.keys]})

    def token(
        self,
        namespace: str = "team-a",
        serviceaccount: str = "agent-1",
        *,
        key: SigningKey | None = None,
        audience: str = "kars-router",
        issuer: str = ISSUER,
        lifetime_s: int = 3600,
        now: float | None = None,
        algorithm: str = "RS256",
        headers: dict[str, Any] | None = None,
    ) -> str:
        key = key or self.keys[0]
        now = time.time() if now is None else now
        claims = {
            "iss": issuer,
            "aud": [audience],
            "sub": f"system:serviceaccount:{namespace}:{serviceaccount}",
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + lifetime_s),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": serviceaccount, "uid": "0b5e6c2e-7a0f-4bd6-9c4b-1f2f1d9a0e11"},
                "pod": {"name": f"{serviceaccount}-pod", "uid": "7d1c2b4a-99d0-4b0e-8e7e-2f1f6c0a5b33"},
            },
        }
        return jwt.encode(claims, key.private, algorithm=algorithm, headers={"kid": key.kid, **(headers or {})})
