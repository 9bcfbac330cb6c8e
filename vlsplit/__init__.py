"""vlsplit: split serving for Qwen vision-language models. The SDK: `vlsplit.Client`, `vlsplit.AsyncClient`."""

from vlsplit.sdk import (Answer, AsyncClient, ChatChoice, ChatResult, Classification, Client, Delta, Label, Retry,
                         Upload, Video, VlsplitError)

__all__ = ["Answer", "AsyncClient", "ChatChoice", "ChatResult", "Classification", "Client", "Delta", "Label", "Retry",
           "Upload", "Video", "VlsplitError"]
