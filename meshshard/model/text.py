"""Text in and out: prompts (raw or through the model's chat template) and streamed decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshshard.errors import MeshShardError


class TextCodec:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.stop_ids: frozenset[int] = frozenset([eos] if isinstance(eos, int) else eos or [])

    @classmethod
    def load(cls, model_dir: Path) -> TextCodec:
        from transformers import AutoTokenizer

        try:
            return cls(AutoTokenizer.from_pretrained(model_dir))
        except (OSError, ValueError) as e:
            raise MeshShardError(f"no usable tokenizer in {model_dir}: {e}") from None

    def encode(self, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
        if not chat:
            return list(self.tokenizer(prompt).input_ids)
        if not self.tokenizer.chat_template:
            raise MeshShardError("this model has no chat template; use a raw prompt")
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        return self.encode_chat(messages)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def stream(self) -> TextStream:
        return TextStream(self)


class TextStream:
    """Turns a growing token list into text pieces, holding back incomplete UTF-8 sequences.

    Decodes only a short window of recent tokens (with a few before it for context, as
    tokenizers join pieces differently at a boundary), so each token costs the same."""

    def __init__(self, codec: TextCodec) -> None:
        self._codec = codec
        self._ids: list[int] = []
        self._prefix = 0  # window start: decoded for context, already sent
        self._read = 0  # tokens whose text has been sent

    def push(self, token: int) -> str:
        self._ids.append(token)
        before = self._codec.decode(self._ids[self._prefix : self._read])
        text = self._codec.decode(self._ids[self._prefix :])
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        self._prefix, self._read = max(self._read - 4, 0), len(self._ids)
        return text[len(before) :]

    @property
    def text(self) -> str:
        return self._codec.decode(self._ids)
