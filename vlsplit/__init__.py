"""vlsplit: split serving for Qwen vision-language models. The SDK: `vlsplit.Client`, `vlsplit.AsyncClient`.

The SDK loads on first use of one of its names, so that the servers, which import only the generated
stubs (`vlsplit.v1`), never load the client package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vlsplit.sdk import (Answer, AsyncClient, ChatChoice, ChatResult, Classification, Client, Delta, Label,
                             Retry, Upload, Video, VlsplitError)

__all__ = ["Answer", "AsyncClient", "ChatChoice", "ChatResult", "Classification", "Client", "Delta", "Label", "Retry",
           "Upload", "Video", "VlsplitError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("vlsplit.sdk"), name)
    raise AttributeError(f"module 'vlsplit' has no attribute {name!r}")
