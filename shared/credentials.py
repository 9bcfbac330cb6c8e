"""Client credentials: bearer tokens and the token-file lines that admit them (the gateway reads the
file, services/gateway/auth.py; `vlsplit token` writes a line). Standard library only: the client
command line makes tokens with nothing server-side installed.

A line is `name:sha256(token)[:scopes[:requests_per_s[:images_per_day]]]`; the token itself is stored nowhere.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

# scope -> the gateway methods it admits
SCOPES = {"ask": ("Ask", "AskStream", "AskMany", "Chat", "ChatStream"), "classify": ("Classify", "Moderate"),
          "upload": ("UploadImage",)}


@dataclass(frozen=True)
class Client:
    """A client the gateway admits: its name (logs, metrics), scopes and limits."""

    name: str
    scopes: frozenset[str]
    requests_per_s: float  # 0 = unlimited
    images_per_day: int  # 0 = unlimited


def new_token(name: str, scopes: str = "*") -> tuple[str, str]:
    """A fresh token and the token-file line that admits it."""
    token = "vls_" + secrets.token_urlsafe(32)
    return token, f"{name}:{hashlib.sha256(token.encode()).hexdigest()}:{scopes}"


def parse_tokens(text: str, requests_per_s: float, images_per_day: int) -> dict[str, Client]:
    """sha256 hex -> Client; ValueError names the bad line."""
    clients: dict[str, Client] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split(":")
        if len(fields) < 2 or len(fields) > 5:
            raise ValueError(f"line {number}: expected name:sha256[:scopes[:requests_per_s[:images_per_day]]]")
        name, digest, *rest = fields
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
            raise ValueError(f"line {number}: a name is 1-64 letters, digits, '.', '_' or '-'")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"line {number}: the token's sha256 must be 64 lowercase hex digits")
        scopes = _scopes(rest[0] if rest else "", number)
        rate = float(rest[1]) if len(rest) > 1 and rest[1] else requests_per_s
        images = int(rest[2]) if len(rest) > 2 and rest[2] else images_per_day
        if rate < 0 or images < 0:
            raise ValueError(f"line {number}: limits are >= 0 (0 = unlimited)")
        if digest in clients:
            raise ValueError(f"line {number}: the same token is listed twice")
        clients[digest] = Client(name, scopes, rate, images)
    return clients


def _scopes(text: str, number: int) -> frozenset[str]:
    if text in ("", "*"):
        return frozenset(SCOPES)
    scopes = frozenset(s.strip() for s in text.split(",") if s.strip())
    unknown = scopes - set(SCOPES)
    if unknown:
        raise ValueError(f"line {number}: unknown scope {sorted(unknown)[0]!r} (known: {', '.join(SCOPES)}, *)")
    return scopes
