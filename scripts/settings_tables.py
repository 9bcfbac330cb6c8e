"""`make settings-docs`: the README's settings tables, written from the fields of shared/config.py.

Each table sits between `<!-- settings:NAME:start -->` and `<!-- settings:NAME:end -->` in README.md;
`--check` writes nothing and exits 1 when the README differs from what this would write
(tests/test_config.py runs it).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pydantic import SecretStr

from shared.config import (CacheConfig, DecoderConfig, EncoderConfig, GatewayConfig, ModelConfig, PREFIX,
                           ServerConfig)

README = Path(__file__).resolve().parent.parent / "README.md"
FIX = "make settings-docs"
VIDEO = ("max_video_", "video_")


def _own(cls, *bases) -> list[str]:
    """The fields of `cls` that none of `bases` declares."""
    inherited = {name for base in bases for name in base.model_fields}
    return [name for name in cls.model_fields if name not in inherited]


TABLES = {  # table -> (class, its fields shown)
    "server": (ServerConfig, list(ServerConfig.model_fields)),
    "cache": (CacheConfig, list(CacheConfig.model_fields)),
    "model": (ModelConfig, list(ModelConfig.model_fields)),
    "encoder": (EncoderConfig, [n for n in _own(EncoderConfig, ServerConfig, CacheConfig, ModelConfig)
                                if not n.startswith(VIDEO)]),
    "video": (EncoderConfig, [n for n in EncoderConfig.model_fields if n.startswith(VIDEO)]),
    "decoder": (DecoderConfig, _own(DecoderConfig, ServerConfig, ModelConfig)),
    "gateway": (GatewayConfig, _own(GatewayConfig, ServerConfig, CacheConfig)),
}


def table(name: str) -> str:
    cls, names = TABLES[name]
    rows = ["| setting (`VLSPLIT_...`) | default | what |", "|---|---|---|"]
    for field_name in names:
        field = cls.model_fields[field_name]
        what = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{field_name.upper()}` | {_default(field_name, field.default)} | {what} |")
    return "\n".join(rows)


def _default(name: str, value) -> str:
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, int) and name.endswith("_bytes") and value:
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value % size == 0:
                return f"{value // size} {unit}"
    if isinstance(value, float):
        return f"{value:g}"
    return f"{value:,}" if isinstance(value, int) and value >= 10000 else str(value)


def render(text: str) -> str:
    """`text` with every settings table rewritten."""
    for name in TABLES:
        pattern = re.compile(rf"(<!-- settings:{name}:start -->\n).*?(<!-- settings:{name}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- settings:{name}:start/end --> markers")
        text = pattern.sub(lambda m: m.group(1) + table(name) + "\n" + m.group(2), text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is stale, writing nothing")
    args = parser.parse_args()
    text = README.read_text()
    fresh = render(text)
    if args.check:
        if fresh != text:
            print(f"README.md's {PREFIX}* settings tables differ from shared/config.py: run `{FIX}`", file=sys.stderr)
            return 1
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
