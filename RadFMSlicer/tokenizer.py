"""Tokenization identical to the RadFM reference, and streaming detokenization.

The reference is transformers 4.28's slow ``LlamaTokenizer`` with RadFM's added tokens
``<image>``, ``</image>`` and ``<image0>``..``<image3199>``. It splits the text on those
tokens, strips whitespace on both sides of each, encodes every remaining text chunk with
sentencepiece (which adds its dummy-prefix space to every chunk) and puts BOS (1) first.
The released ``tokenizer_config.json`` has empty bos/eos/unk strings, so the ids are fixed
here: BOS 1, EOS 2, as RadFM trained.
"""

import re
from pathlib import Path

import sentencepiece as spm

from .errors import CheckpointError, PromptError

BOS_ID = 1
EOS_ID = 2
IMAGE_START = "<image>"
IMAGE_END = "</image>"
NUM_IMAGE_PLACEHOLDERS = 3200  # <image0> .. <image3199> in the released vocabulary
_SPECIAL_PATTERN = re.compile(r"</?image\d*>")
SPECIAL_TAGS = frozenset([IMAGE_START, IMAGE_END, *(f"<image{t}>" for t in range(NUM_IMAGE_PLACEHOLDERS))])


def image_tag(k: int, tokens_per_image: int = 32) -> str:
    """The text that stands for image ``k`` (0-based) of a prompt: ``<image>`` + 32 slots + ``</image>``."""
    if not 0 <= k < NUM_IMAGE_PLACEHOLDERS // tokens_per_image:
        raise ValueError(f"image index {k} out of range: RadFM's vocabulary holds "
                         f"{NUM_IMAGE_PLACEHOLDERS // tokens_per_image} images")
    first = tokens_per_image * k
    return IMAGE_START + "".join(f"<image{first + j}>" for j in range(tokens_per_image)) + IMAGE_END


def special_tags_in(text: str) -> list[str]:
    """The spellings in ``text`` that :meth:`RadFMTokenizer.encode` turns into image tokens, in order.

    Sentencepiece keeps ``<s>``, ``</s>`` and ``<unk>`` typed as text as text; only these are special.
    """
    return [m.group() for m in _SPECIAL_PATTERN.finditer(text) if m.group() in SPECIAL_TAGS]


class RadFMTokenizer:
    """Sentencepiece plus RadFM's image tokens (ids ``vocab``, ``vocab+1``, ``vocab+2+t``)."""

    def __init__(self, model_file: "str | Path", tokens_per_image: int = 32):
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(model_file))
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{model_file} is not a sentencepiece tokenizer model: {exc}") from exc
        self.vocab_size = self.sp.GetPieceSize()
        self.tokens_per_image = tokens_per_image
        self.special_ids = {IMAGE_START: self.vocab_size, IMAGE_END: self.vocab_size + 1}
        for t in range(NUM_IMAGE_PLACEHOLDERS):
            self.special_ids[f"<image{t}>"] = self.vocab_size + 2 + t
        self.special_text = {i: s for s, i in self.special_ids.items()}

    def image_tag(self, k: int) -> str:
        return image_tag(k, self.tokens_per_image)

    def _split(self, text: str) -> list[str]:
        """Text chunks and special tokens, whitespace next to special tokens stripped."""
        pieces, last = [], 0
        for match in _SPECIAL_PATTERN.finditer(text):
            if match.group() in self.special_ids:
                pieces += [text[last:match.start()], match.group()]
                last = match.end()
        pieces.append(text[last:])
        for i in range(1, len(pieces), 2):  # odd positions hold special tokens
            pieces[i - 1] = pieces[i - 1].rstrip()
            pieces[i + 1] = pieces[i + 1].lstrip()
        return pieces

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise PromptError(f"a prompt is text, got {type(text).__name__}")
        try:
            text.encode("utf-8")  # sentencepiece cannot take a lone surrogate: it fails with a C++ cast error
        except UnicodeEncodeError as exc:
            raise PromptError(f"the prompt is not UTF-8 text (U+{ord(text[exc.start]):04X} at character "
                              f"{exc.start + 1})") from None
        ids = [BOS_ID]
        for i, piece in enumerate(self._split(text)):
            if i % 2:
                ids.append(self.special_ids[piece])
            elif piece:
                ids += self.sp.EncodeAsIds(piece)
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; image ids render as their tags, BOS/EOS as nothing."""
        out, run = [], []
        for i in ids:
            if i < self.vocab_size:
                run.append(i)
                continue
            out.append(self.sp.DecodeIds(run))
            run = []
            out.append(self.special_text.get(i, ""))
        out.append(self.sp.DecodeIds(run))
        return "".join(out)


class StreamDecoder:
    """Turns token ids, one at a time, into text deltas that concatenate to ``decode(all)``.

    Sentencepiece drops the leading space of a decoded run and byte-fallback pieces
    decode to U+FFFD until the character is complete, so each delta is the difference
    between decoding a short window with and without the new tokens, and nothing is
    emitted while the window ends in an incomplete character.
    """

    def __init__(self, tokenizer: RadFMTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # window start
        self._read = 0  # tokens already turned into text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        full = self.tokenizer.decode(self.ids)
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        return delta
