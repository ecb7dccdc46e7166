"""Tokenizers: byte-level BPE rebuilt from GGUF metadata (or a tokenizer.json), and a
byte tokenizer for the tiny test presets. Both render the model's chat template."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from ..errors import UserError
from ..fileio import read_json_object
from .gguf_loader import field_value

# llama.cpp pre-tokenizer names -> whether digits are split one by one before the GPT-2 regex.
_PRE_INDIVIDUAL_DIGITS = {"smollm": True, "starcoder": True, "refact": True, "gpt2": False, "default": False}

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def render_chat_template(template: str, messages: Sequence[dict], add_generation_prompt: bool = True, **extra) -> str:
    """Render a Hugging Face style Jinja chat template (sandboxed, as transformers does)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise UserError(f"chat template: {message}")

    env.globals["raise_exception"] = raise_exception
    from jinja2 import TemplateError

    try:
        return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                **extra)
    except TemplateError as exc:  # a syntax error or a failing template of the model's tokenizer
        raise UserError(f"the model's chat template is broken ({type(exc).__name__}: {exc})") from None


# ChatML, used when a model ships no template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with the model's special tokens and chat template."""

    def __init__(self, backend, bos_id: Optional[int], eos_id: Optional[int], chat_template: Optional[str],
                 stop_tokens: Iterable[str] = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>")):
        self.backend = backend
        self.bos_id, self.eos_id = bos_id, eos_id
        self.chat_template = chat_template
        self.stop_ids = {i for i in (eos_id,) if i is not None}
        for tok in stop_tokens:
            tid = backend.token_to_id(tok)
            if tid is not None:
                self.stop_ids.add(tid)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> List[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        return render_chat_template(self.chat_template or DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt)

    # ----- persistence (travels with our checkpoints) -------------------------
    def save(self, directory) -> None:
        directory = Path(directory)
        self.backend.save(str(directory / TOKENIZER_FILE))
        meta = {"bos_token_id": self.bos_id, "eos_token_id": self.eos_id, "chat_template": self.chat_template}
        (directory / TOKENIZER_CONFIG).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        directory = Path(directory)
        tok_path = directory / TOKENIZER_FILE
        if not tok_path.is_file():
            raise UserError(f"{directory}: no {TOKENIZER_FILE}")
        try:
            backend = HFTokenizer.from_file(str(tok_path))
        except Exception as exc:
            raise UserError(f"{tok_path}: cannot read tokenizer ({exc})") from None
        meta = {}
        cfg_path = directory / TOKENIZER_CONFIG
        if cfg_path.is_file():
            meta = read_json_object(cfg_path, "tokenizer configuration")
        bos, eos = meta.get("bos_token_id"), meta.get("eos_token_id")
        for key, attr in (("bos_token", "bos"), ("eos_token", "eos")):  # HF tokenizer_config.json style
            tok = meta.get(key)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str) and backend.token_to_id(tok) is not None:
                if attr == "bos" and bos is None:
                    bos = backend.token_to_id(tok)
                if attr == "eos" and eos is None:
                    eos = backend.token_to_id(tok)
        return cls(backend, bos, eos, meta.get("chat_template"))


def tokenizer_from_gguf(reader, path) -> Tokenizer:
    """Byte-level BPE from ``tokenizer.ggml.*`` metadata (vocab, merges, token types, template)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    kind = field_value(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"{path}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    merges = field_value(reader, "tokenizer.ggml.merges") or []
    types = field_value(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = field_value(reader, "tokenizer.ggml.pre", "default")
    if pre not in _PRE_INDIVIDUAL_DIGITS:
        raise UserError(f"{path}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(sorted(_PRE_INDIVIDUAL_DIGITS))})")
    vocab: Dict[str, int] = {t: i for i, t in enumerate(tokens)}
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))
    steps = []
    if _PRE_INDIVIDUAL_DIGITS[pre]:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    # token type 3 = control, 4 = user-defined: matched whole before BPE, as llama.cpp does.
    special = [AddedToken(tokens[i], special=(types[i] == 3), normalized=False)
               for i in range(len(tokens)) if types[i] in (3, 4)]
    if special:
        backend.add_special_tokens([t for t in special if t.special])
        backend.add_tokens([t for t in special if not t.special])
    return Tokenizer(backend, field_value(reader, "tokenizer.ggml.bos_token_id"),
                     field_value(reader, "tokenizer.ggml.eos_token_id"),
                     field_value(reader, "tokenizer.chat_template"))


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 3..258 folded into the vocab): for tiny random test models."""

    def __init__(self, vocab_size: int = 256):
        self.vocab_size = vocab_size
        self.bos_id, self.eos_id = 1, 2
        self.stop_ids = {2}
        self.chat_template = DEFAULT_CHAT_TEMPLATE

    def encode(self, text: str, add_bos: bool = False) -> List[int]:
        ids = [3 + (b % (self.vocab_size - 3)) for b in text.encode("utf-8")]
        return ([self.bos_id] if add_bos else []) + ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        data = bytes((i - 3) % 256 for i in ids if i >= 3)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        return render_chat_template(self.chat_template, messages, add_generation_prompt)

    def save(self, directory) -> None:
        (Path(directory) / TOKENIZER_CONFIG).write_text(json.dumps({"byte_tokenizer": self.vocab_size}))


def load_tokenizer_for(path):
    """The tokenizer saved in a model directory (``tokenizer.json`` or a byte tokenizer's
    ``tokenizer_config.json``), or None when it has none."""
    path = Path(path)
    if (path / TOKENIZER_FILE).is_file():
        return Tokenizer.load(path)
    cfg = path / TOKENIZER_CONFIG
    if cfg.is_file():
        meta = read_json_object(cfg, "tokenizer configuration")
        if "byte_tokenizer" in meta:
            n = meta["byte_tokenizer"]
            if isinstance(n, bool) or not isinstance(n, int) or not 4 <= n <= 1 << 24:
                raise UserError(f"{cfg}: byte_tokenizer must be a vocabulary size, got {n!r}")
            return ByteTokenizer(n)
    return None
