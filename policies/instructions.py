"""Embed task instructions onboard: a standard-library BERT WordPiece tokenizer and the packaged sentence
encoder (all-MiniLM-L6-v2) run by onnxruntime.

Onboard code: numpy, onnxruntime and the standard library only (never torch, transformers,
sentence-transformers or tokenizers). The encoder bundle is written offline by
`vigil bundle encoder --out DIR` (vigil.training.encoder_export); docs/bundles.md describes it.

The tokenizer reproduces the Hugging Face `tokenizers` pipeline the package uses (BertNormalizer,
BertPreTokenizer, WordPiece, [CLS] ... [SEP] template, truncation to max_length), including its order
of operations where it differs from the original Python BERT code: accents are stripped before
lower-casing, lower-casing is per character, and a special token written in the text ("[MASK]") is
kept as that token. Instructions are embedded once per episode, so `InstructionEncoder` keeps an LRU
cache: the same instruction is never run twice.
"""

from __future__ import annotations

import json
import re
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from vigil.policies.bundle import providers, session_options
from vigil.policies.manifest import ManifestError, sha256_file

FORMAT = 1

# Rust's char::is_whitespace (the Unicode White_Space property), which `tokenizers` uses.
_WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                        "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
# CJK Unified Ideographs blocks, as BERT defines "Chinese characters" (not Hangul, not kana). `tokenizers`
# starts the Extension E range at 0x2B920 where BERT has 0x2B820; we follow `tokenizers`, which the package uses.
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


class EncoderBundleError(ManifestError):
    """An encoder bundle that cannot be used; the message names the file and what is wrong."""


def _is_whitespace(c: str) -> bool:
    return c in _WHITESPACE


def _is_control(c: str) -> bool:
    """Tab, newline and carriage return count as whitespace; Cc, Cf, Co and Cs are control. Unassigned code
    points (Cn) are kept, as `tokenizers` keeps them (the original Python BERT code drops them)."""
    return c not in "\t\n\r" and unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs")


def _is_punctuation(c: str) -> bool:
    """BERT: ASCII punctuation (33-47, 58-64, 91-96, 123-126, so also $ + < = > ^ ` | ~) or Unicode P*."""
    cp = ord(c)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(c)[0] == "P"


def _is_cjk(c: str) -> bool:
    cp = ord(c)
    return any(lo <= cp <= hi for lo, hi in _CJK)


class WordPieceTokenizer:
    """BERT tokenization (basic + WordPiece) with the standard library, as the Hugging Face tokenizer does it.

    `encode(text)` returns the input ids: [CLS] tokens [SEP], truncated to `max_length` ids in all.
    """

    def __init__(self, vocab: Mapping[str, int], *, max_length: int = 256, do_lower_case: bool = True,
                 strip_accents: bool | None = None, clean_text: bool = True, tokenize_chinese_chars: bool = True,
                 unk_token: str = "[UNK]", cls_token: str = "[CLS]", sep_token: str = "[SEP]",
                 pad_token: str = "[PAD]", special_tokens: Iterable[str] = ("[MASK]",),
                 continuing_subword_prefix: str = "##", max_input_chars_per_word: int = 100):
        if max_length < 2:
            raise ValueError(f"max_length must leave room for [CLS] and [SEP], got {max_length}")
        self.vocab = dict(vocab)
        self.max_length = max_length
        self.do_lower_case = do_lower_case
        self.strip_accents = do_lower_case if strip_accents is None else strip_accents
        self.clean_text = clean_text
        self.tokenize_chinese_chars = tokenize_chinese_chars
        self.prefix = continuing_subword_prefix
        self.max_chars = max_input_chars_per_word
        for token in (unk_token, cls_token, sep_token, pad_token, *special_tokens):
            if token not in self.vocab:
                raise ValueError(f"special token {token!r} is not in the vocabulary")
        self.unk_token = unk_token
        self.unk_id, self.cls_id = self.vocab[unk_token], self.vocab[cls_token]
        self.sep_id, self.pad_id = self.vocab[sep_token], self.vocab[pad_token]
        specials = sorted({unk_token, cls_token, sep_token, pad_token, *special_tokens}, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(t) for t in specials))  # longest first, case-sensitive

    @classmethod
    def from_vocab_file(cls, path: str | Path, **options: Any) -> WordPieceTokenizer:
        """vocab.txt: one token per line, the line number is the id (as BERT's load_vocab reads it)."""
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return cls({token: i for i, token in enumerate(lines)}, **options)

    # -- basic tokenization ----------------------------------------------------------------------------

    def normalize(self, text: str) -> str:
        """BertNormalizer: clean text, space out CJK characters, strip accents, lower-case (in that order)."""
        if self.clean_text:
            text = "".join(" " if _is_whitespace(c) else c for c in text
                           if not (c == "\0" or c == "\ufffd" or _is_control(c)))
        if self.tokenize_chinese_chars:
            text = "".join(f" {c} " if _is_cjk(c) else c for c in text)
        if self.strip_accents:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        if self.do_lower_case:
            text = "".join(c.lower() for c in text)  # per character, as tokenizers does (no final-sigma rule)
        return text

    @staticmethod
    def pre_tokenize(text: str) -> list[str]:
        """BertPreTokenizer: split on whitespace (dropped) and around each punctuation character (kept)."""
        words: list[str] = []
        current: list[str] = []
        for c in text:
            if _is_whitespace(c) or _is_punctuation(c):
                if current:
                    words.append("".join(current))
                    current = []
                if not _is_whitespace(c):
                    words.append(c)
            else:
                current.append(c)
        if current:
            words.append("".join(current))
        return words

    def wordpiece(self, word: str) -> list[str]:
        """Greedy longest-match-first; a word that cannot be covered, or is too long, is one [UNK]."""
        if len(word) > self.max_chars:
            return [self.unk_token]
        pieces: list[str] = []
        start = 0
        while start < len(word):
            end = len(word)
            piece = None
            while start < end:
                sub = word[start:end] if start == 0 else self.prefix + word[start:end]
                if sub in self.vocab:
                    piece = sub
                    break
                end -= 1
            if piece is None:
                return [self.unk_token]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """Word pieces of `text`, without [CLS]/[SEP] and without truncation."""
        tokens: list[str] = []
        pos = 0
        for match in self._special_re.finditer(text):  # special tokens written in the text stay whole
            tokens += self._tokenize_plain(text[pos:match.start()])
            tokens.append(match.group())
            pos = match.end()
        tokens += self._tokenize_plain(text[pos:])
        return tokens

    def _tokenize_plain(self, text: str) -> list[str]:
        return [p for word in self.pre_tokenize(self.normalize(text)) for p in self.wordpiece(word)]

    def encode(self, text: str) -> list[int]:
        """Input ids: [CLS] + ids + [SEP], the word pieces truncated so that at most max_length ids result."""
        ids = [self.vocab.get(t, self.unk_id) for t in self.tokenize(text)][: self.max_length - 2]
        return [self.cls_id, *ids, self.sep_id]

    def batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int64 (n, longest), right-padded with the pad id."""
        return self.pad([self.encode(t) for t in texts])

    def pad(self, encoded: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) of already encoded texts, right-padded to the longest."""
        width = max((len(e) for e in encoded), default=2)
        ids = np.full((len(encoded), width), self.pad_id, np.int64)
        mask = np.zeros((len(encoded), width), np.int64)
        for i, e in enumerate(encoded):
            ids[i, :len(e)] = e
            mask[i, :len(e)] = 1
        return ids, mask


class InstructionEncoder:
    """Sentence embeddings of task instructions from an encoder bundle (encoder.onnx, vocab.txt,
    encoder.json): `embed(texts)` -> float32 (n, dim), unit norm, cached per instruction (LRU)."""

    def __init__(self, folder: Path, meta: Mapping[str, Any], tokenizer: WordPieceTokenizer,
                 session: ort.InferenceSession, cache_size: int = 256, batch_size: int = 32):
        self.folder = folder
        self.meta = dict(meta)
        self.tokenizer = tokenizer
        self.session = session
        self.dim = int(meta["dim"])
        self.cache_size = cache_size
        self.batch_size = batch_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.runs = 0  # session.run calls so far
        self.hits = 0
        self.misses = 0
        self._output = meta["onnx"].get("output", "embedding")
        self._lock = threading.Lock()  # one encoder may serve the loop and a hot swap's loader at once

    @classmethod
    def load(cls, folder: str | Path, threads: int = 1, prefer_gpu: bool = True, cache_size: int = 256,
             batch_size: int = 32, reuse: InstructionEncoder | None = None) -> InstructionEncoder:
        """Read encoder.json, check the sha256 of encoder.onnx and vocab.txt, and open the session; or, when
        `reuse` is an encoder loaded from an identical bundle (the same encoder.json, so the same sha256s),
        return `reuse` itself (embed is thread-safe)."""
        folder = Path(folder)
        meta = read_encoder_meta(folder)
        if reuse is not None and reuse.meta == meta:
            return reuse
        try:
            tokenizer = _tokenizer_from_meta(folder, meta)
        except ValueError as exc:
            raise EncoderBundleError(f"{folder / meta['vocab']['file']}: {exc}") from None
        size = meta["vocab"].get("size")
        if size is not None and size != len(tokenizer.vocab):
            raise EncoderBundleError(f"{folder / meta['vocab']['file']} has {len(tokenizer.vocab)} tokens, "
                                     f"but encoder.json key 'vocab.size' says {size}")
        onnx_path = folder / meta["onnx"]["file"]
        session = ort.InferenceSession(str(onnx_path), session_options(threads), providers=providers(prefer_gpu))
        inputs = {i.name for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        output = meta["onnx"].get("output", "embedding")
        if inputs != {"input_ids", "attention_mask"} or output not in outputs:
            raise EncoderBundleError(f"{onnx_path}: expected inputs input_ids, attention_mask and output {output!r}; "
                                     f"the graph has inputs {sorted(inputs)} and outputs {sorted(outputs)}")
        return cls(folder, meta, tokenizer, session, cache_size, batch_size)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (len(texts), dim): one row per text, each computed at most once while it stays cached."""
        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of instructions; wrap a single one in a list: embed([text])")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"instructions must be str, got {type(t).__name__}")
        with self._lock:
            return self._embed(texts)

    def _embed(self, texts: list[str]) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        encoded = {t: self.tokenizer.encode(t) for t in missing}
        missing.sort(key=lambda t: len(encoded[t]))  # batches of similar lengths: little padding
        computed: dict[str, np.ndarray] = {}
        for i in range(0, len(missing), self.batch_size):
            chunk = missing[i:i + self.batch_size]
            computed.update(zip(chunk, self._run([encoded[t] for t in chunk])))
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        rows = []
        for t in texts:
            row = computed.get(t)
            if row is None:
                row = self._cache[t]
                self._cache.move_to_end(t)
            rows.append(row)
        for t, row in computed.items():
            self._remember(t, row)
        return np.stack(rows) if rows else np.zeros((0, self.dim), np.float32)

    def _run(self, encoded: Sequence[Sequence[int]]) -> np.ndarray:
        ids, mask = self.tokenizer.pad(encoded)
        self.runs += 1
        out = self.session.run([self._output], {"input_ids": ids, "attention_mask": mask})[0]
        out = np.asarray(out, np.float32)
        if out.shape != (len(encoded), self.dim):
            raise EncoderBundleError(f"encoder returned shape {out.shape}, expected {(len(encoded), self.dim)}")
        out.setflags(write=False)  # rows are shared with the cache
        return out

    def _remember(self, text: str, row: np.ndarray) -> None:
        if self.cache_size <= 0:
            return
        self._cache[text] = row
        self._cache.move_to_end(text)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def cache_info(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "runs": self.runs, "size": len(self._cache),
                "capacity": self.cache_size}

    def clear_cache(self) -> None:
        self._cache.clear()


def read_encoder_meta(folder: str | Path) -> dict[str, Any]:
    """encoder.json of an encoder bundle, validated, with the sha256 of encoder.onnx and vocab.txt checked."""
    folder = Path(folder)
    path = folder / "encoder.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EncoderBundleError(f"{path} not found: an encoder bundle is a folder with encoder.onnx, vocab.txt "
                                 "and encoder.json (vigil bundle encoder --out DIR)") from None
    except json.JSONDecodeError as exc:
        raise EncoderBundleError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise EncoderBundleError(f"{path} must hold a JSON object")
    if meta.get("format", FORMAT) != FORMAT:
        raise EncoderBundleError(f"{path}: key 'format' must be {FORMAT}, got {meta.get('format')!r}")
    for key, typ in (("dim", int), ("max_length", int), ("do_lower_case", bool), ("special_tokens", dict),
                     ("onnx", dict), ("vocab", dict)):
        if not isinstance(meta.get(key), typ) or (typ is int and isinstance(meta.get(key), bool)):
            raise EncoderBundleError(f"{path}: key {key!r} must be {typ.__name__}, got {meta.get(key)!r}")
    for name in ("unk", "cls", "sep", "pad"):
        if not isinstance(meta["special_tokens"].get(name), str):
            raise EncoderBundleError(f"{path}: key 'special_tokens.{name}' must be a string")
    for key, default in (("onnx", "encoder.onnx"), ("vocab", "vocab.txt")):
        entry = meta[key]
        entry.setdefault("file", default)
        file = folder / entry["file"]
        sha = entry.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64:
            raise EncoderBundleError(f"{path}: key '{key}.sha256' must be the 64-hex-digit sha256 of {entry['file']}")
        if not file.is_file():
            raise EncoderBundleError(f"{path}: key '{key}.file' names {file}, which does not exist")
        actual = sha256_file(file)
        if actual != sha:
            raise EncoderBundleError(f"{file} has sha256 {actual}, but encoder.json key '{key}.sha256' says {sha}: "
                                     "the encoder bundle was modified or is incomplete")
    return meta


def _tokenizer_from_meta(folder: Path, meta: Mapping[str, Any]) -> WordPieceTokenizer:
    special = meta["special_tokens"]
    return WordPieceTokenizer.from_vocab_file(
        folder / meta["vocab"]["file"], max_length=meta["max_length"], do_lower_case=meta["do_lower_case"],
        strip_accents=meta.get("strip_accents"), clean_text=meta.get("clean_text", True),
        tokenize_chinese_chars=meta.get("tokenize_chinese_chars", True),
        unk_token=special["unk"], cls_token=special["cls"], sep_token=special["sep"], pad_token=special["pad"],
        special_tokens=[t for k, t in special.items() if k not in ("unk", "cls", "sep", "pad")],
        continuing_subword_prefix=meta.get("continuing_subword_prefix", "##"),
        max_input_chars_per_word=meta.get("max_input_chars_per_word", 100))
