"""Tokenizers of the released RWKV models (SPEC.md §2).

- ``WorldTokenizer``: the World vocabulary ``rwkv_vocab_v20230424`` (65,529 entries, ids 1..65529;
  id 0 is end-of-document; models have 65,536 rows). Encoding is **greedy longest match** over the
  UTF-8 bytes: at each position emit the longest vocabulary entry that is a prefix of what is left.
  Not BPE. Every byte is a token (byte ``b`` is id ``b + 1``), so any byte string encodes.
  Text is encoded by ``pyrwkv-tokenizer`` (Rust, ships the vocabulary; a dependency) when it is
  installed, which our tests prove token-for-token equal to the reference encoder here
  (``encode_bytes``, pure Python, also used for byte strings that are not valid UTF-8).
- ``ByteTokenizer``: id = byte (256 ids), for tiny test models.
- ``HFTokenizer`` / ``PileTokenizer``: a HuggingFace ``tokenizers`` JSON file such as the GPT-NeoX
  ``20B_tokenizer.json`` of Pile models (50,277 ids); no PyPI package we know ships that file, so it
  takes a path (needs the ``tokenizers`` package).

``default_tokenizer(vocab_size)`` is what ``generate``, ``score`` and the CLI use when none is named.

Every tokenizer has ``vocab_size``, ``encode(text) -> list[int]``, ``decode_bytes(ids) -> bytes`` and
``decode(ids) -> str`` (invalid UTF-8 becomes U+FFFD).
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path

WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"
WORLD_VOCAB_SIZE = 65536  # model rows; the file has ids 1..65529, 0 is end-of-document
PILE_VOCAB_SIZE = 50277
PILE_MODEL_VOCAB_SIZES = (50277, 50304)  # the released Pile models pad their head to a multiple of 64
PILE_TOKENIZER_FILE = "20B_tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer file is missing, malformed, or does not fit the model."""


def find_world_vocab() -> Path:
    """The World vocabulary file from an installed package (``pyrwkv-tokenizer``, else ``rwkv``)."""
    for module in ("pyrwkv_tokenizer", "rwkv"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        path = Path(mod.__file__).parent / WORLD_VOCAB_FILE
        if path.is_file():
            return path
    raise TokenizerError(
        f"the World vocabulary {WORLD_VOCAB_FILE} was not found: install `pyrwkv-tokenizer` (a dependency "
        f"of rwkv-zoo) or pass WorldTokenizer(vocab_file=PATH)"
    )


def read_world_vocab(path: str | os.PathLike) -> dict[int, bytes]:
    """Parse ``<id> <python str or bytes literal> <byte length>`` lines (SPEC §2.1); checks each length."""
    vocab: dict[int, bytes] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            try:
                first, last = line.index(" "), line.rindex(" ")
                idx, length, text = int(line[:first]), int(line[last:]), line[first + 1 : last]
                if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" and "\\" not in text:
                    literal: str | bytes = text[1:-1]  # a plain quoted string (most lines): no need to parse
                else:
                    literal = ast.literal_eval(text)
            except (ValueError, SyntaxError) as exc:
                raise TokenizerError(f"{path}:{lineno}: not '<id> <literal> <length>': {line[:80]!r}") from exc
            token = literal.encode("utf-8") if isinstance(literal, str) else literal
            if len(token) != length:
                raise TokenizerError(f"{path}:{lineno}: token is {len(token)} bytes, the line says {length}")
            vocab[idx] = token
    return vocab


class WorldTokenizer:
    """The RWKV World tokenizer: greedy longest match over ``rwkv_vocab_v20230424`` (SPEC §2.1).

    ``fast=True`` (default) encodes text with ``pyrwkv_tokenizer`` when it is installed and the vocab
    is the one it ships; ``encode_bytes`` is the reference encoder and accepts any bytes.
    """

    vocab_size = WORLD_VOCAB_SIZE
    eos_id = 0

    def __init__(self, vocab_file: str | os.PathLike | None = None, *, fast: bool = True):
        self.vocab_file = Path(vocab_file) if vocab_file is not None else find_world_vocab()
        self.idx2token = read_world_vocab(self.vocab_file)
        self.token2idx = {t: i for i, t in self.idx2token.items()}
        # Lengths of the tokens starting with each two bytes, longest first (a variant of the RWKV-LM
        # demo's table): the first length whose slice is a token is the longest match.
        lengths: dict[bytes, set[int]] = {}
        for tok in self.token2idx:
            if len(tok) >= 2:
                lengths.setdefault(tok[:2], set()).add(len(tok))
        self._lengths = {k: sorted(v, reverse=True) for k, v in lengths.items()}
        self._fast = None
        if fast and vocab_file is None:
            try:
                import pyrwkv_tokenizer
            except ImportError:
                pass
            else:
                shipped = Path(pyrwkv_tokenizer.__file__).parent / WORLD_VOCAB_FILE
                if shipped.is_file() and shipped.resolve() == self.vocab_file.resolve():
                    self._fast = pyrwkv_tokenizer.WorldTokenizer(str(shipped))

    # -- encoding -----------------------------------------------------------------------------------
    def encode_bytes(self, data: bytes) -> list[int]:
        """Reference greedy longest match over raw bytes (any bytes, valid UTF-8 or not)."""
        lengths, token2idx = self._lengths, self.token2idx
        out: list[int] = []
        i, n = 0, len(data)
        while i < n:
            idx = None
            for length in lengths.get(data[i : i + 2], ()):
                idx = token2idx.get(data[i : i + length])
                if idx is not None:
                    i += length
                    break
            if idx is None:
                idx = data[i] + 1  # every byte b is token b + 1 (SPEC §2.1)
                i += 1
            out.append(idx)
        return out

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str (use encode_bytes for bytes), got {type(text).__name__}")
        if self._fast is not None:
            return list(self._fast.encode(text))
        return self.encode_bytes(text.encode("utf-8"))

    # -- decoding -----------------------------------------------------------------------------------
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        parts = []
        for i in ids:
            tok = self.idx2token.get(int(i))
            if tok is None:
                if i == self.eos_id:
                    continue  # end-of-document has no text
                raise TokenizerError(f"token id {i} is not in the World vocabulary (ids 1..{len(self.idx2token)})")
            parts.append(tok)
        return b"".join(parts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"WorldTokenizer({str(self.vocab_file)!r}, fast={self._fast is not None})"


class HFTokenizer:
    """A HuggingFace ``tokenizers`` JSON file (e.g. GPT-NeoX ``20B_tokenizer.json`` for Pile models)."""

    def __init__(self, path: str | os.PathLike):
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise TokenizerError("HF tokenizer files need the `tokenizers` package: pip install tokenizers") from exc
        if not os.path.isfile(path):
            raise TokenizerError(f"tokenizer file not found: {path}")
        self.path = Path(path)
        self._tok = Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        # Byte-level BPE: map each token back to its bytes so streaming can wait for whole characters.
        table = _bytelevel_decoder()
        out = bytearray()
        for i in ids:
            piece = self._tok.id_to_token(int(i))
            if piece is None:
                raise TokenizerError(f"token id {i} is not in {self.path.name} ({self.vocab_size} ids)")
            if all(ch in table for ch in piece):
                out += bytes(table[ch] for ch in piece)
            else:  # an added token stored as plain text
                out += self._tok.decode([int(i)], skip_special_tokens=False).encode("utf-8")
        return bytes(out)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


PileTokenizer = HFTokenizer


class ByteTokenizer:
    """Token id = UTF-8 byte value (256 ids): for tiny test models and byte-level experiments."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> list[int]:
        return list(data)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        try:
            return bytes(int(i) for i in ids)
        except ValueError as exc:
            raise TokenizerError(f"byte tokenizer ids are 0..255: {exc}") from exc

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer()"


@lru_cache(maxsize=1)
def _bytelevel_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-character map, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def get_tokenizer(name_or_path: str | os.PathLike | None = None):
    """``"world"`` (default), ``"bytes"``, a ``.json`` HF tokenizer file, or a World-format vocab ``.txt``."""
    if str(name_or_path).lower() in ("bytes", "byte"):
        return ByteTokenizer()
    if name_or_path is None or str(name_or_path).lower() in ("world", WORLD_VOCAB_FILE.removesuffix(".txt")):
        return _world()
    path = str(name_or_path)
    if path.endswith(".json"):
        return HFTokenizer(path)
    if path.endswith(".txt"):
        return WorldTokenizer(path)
    raise TokenizerError(f"unknown tokenizer {path!r}: use 'world', 'bytes', a tokenizer .json or a World vocab .txt")


@lru_cache(maxsize=1)
def _world() -> WorldTokenizer:
    return WorldTokenizer()


def find_pile_tokenizer() -> Path | None:
    """``20B_tokenizer.json`` where an installed package ships it (some ``rwkv`` releases do), else None."""
    for module in ("rwkv",):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        path = Path(mod.__file__).parent / PILE_TOKENIZER_FILE
        if path.is_file():
            return path
    return None


def default_tokenizer(vocab_size: int):
    """The tokenizer a model with ``vocab_size`` rows takes when none is named.

    World for 65,536; the Pile's ``20B_tokenizer.json`` for 50,277 / 50,304 when a package ships it;
    bytes for 256 up to the Pile's size, because every released RWKV vocabulary is at least that large,
    so a smaller one is a byte-level or test model (the ``tiny``/``small`` presets). Anything else raises
    ``TokenizerError`` saying what to pass.
    """
    V = int(vocab_size)
    if V == WORLD_VOCAB_SIZE:
        return _world()
    if V in PILE_MODEL_VOCAB_SIZES:
        path = find_pile_tokenizer()
        if path is None:
            raise TokenizerError(
                f"the model's vocabulary of {V} is the Pile's, whose {PILE_TOKENIZER_FILE} no installed package "
                f"ships: pass its path (Python: tokenizer=HFTokenizer(PATH); command line: --tokenizer PATH)"
            )
        return HFTokenizer(path)
    if 256 <= V < PILE_VOCAB_SIZE:
        return ByteTokenizer()
    raise TokenizerError(
        f"no default tokenizer fits a vocabulary of {V}: pass token ids, or a tokenizer whose ids fit "
        f"(Python: tokenizer=...; command line: --tokenizer world, bytes, a .json or a World vocab .txt)"
    )
