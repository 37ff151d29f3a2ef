"""The tokenizer side of a model, in the HTTP process: chat template, tokenize, detokenize, request checks.

It loads the GGUF's vocabulary only (no weights, no devices), so that preparing requests never waits for the
engine's decode loop and a crash of the engine leaves it standing. The engine process detokenizes what it
samples with the same vocabulary.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from server.engine.chat_template import ChatTemplate
from server.engine.errors import EngineError, EngineRequestError
from server.engine.protocol import GenerationRequest


@functools.cache
def llama_cpp() -> Any:
    """llama_cpp, imported and initialised on first use (importing this module stays cheap)."""
    from tuner.llamacpp import llama_cpp_module

    module = llama_cpp_module()
    module.llama_backend_init()
    return module


def token_piece(lc: Any, vocab: Any, token: int, special: bool) -> bytes:
    """The bytes of one token (a piece may be part of a UTF-8 character)."""
    buf = ctypes.create_string_buffer(64)
    n = lc.llama_token_to_piece(vocab, token, buf, 64, 0, special)
    if n < 0:  # a piece longer than 64 bytes: -n is its length
        buf = ctypes.create_string_buffer(-n)
        n = lc.llama_token_to_piece(vocab, token, buf, -n, 0, special)
    return buf.raw[: max(n, 0)]


class Tokenizer:
    """One model's vocabulary and chat template; thread-safe (llama.cpp's tokenizer is read-only)."""

    def __init__(self, path: str | Path, *, chat_template: str | None = None) -> None:
        from server.engine.sampling import GrammarCache
        from tuner.llamacpp import LoadError, open_vocab

        lc = llama_cpp()
        self._lc = lc
        try:
            self._model = open_vocab(path)
        except LoadError as exc:
            raise EngineError(str(exc)) from exc
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab: int = lc.llama_vocab_n_tokens(self._vocab)
        self._add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))
        raw = lc.llama_model_chat_template(self._model, None)
        self.template = ChatTemplate.choose(
            chat_template,
            raw.decode("utf-8", errors="replace") if raw else None,
            bos_token=self._special_text(lc.llama_vocab_bos(self._vocab)),
            eos_token=self._special_text(lc.llama_vocab_eos(self._vocab)),
        )
        self._grammars = GrammarCache(lc, self._vocab)

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> list[int]:
        prompt = self.template.render(messages, tools=tools)
        # Templates that write the BOS text themselves must not get a second BOS from the tokenizer.
        bos = self.template.bos_token
        add_bos = self._add_bos and not (bos and prompt.startswith(bos))
        return self._tokenize(prompt, add_bos=add_bos)

    def encode_text(self, text: str) -> list[int]:
        return self._tokenize(text, add_bos=self._add_bos)

    def decode_tokens(self, tokens: Sequence[int]) -> str:
        pieces = b"".join(token_piece(self._lc, self._vocab, t, special=False) for t in tokens)
        return pieces.decode("utf-8", errors="replace")

    def prepare(self, request: GenerationRequest) -> GenerationRequest:
        """Check token ids against the vocabulary and compile the output constraint into a grammar."""
        for token in request.sampling.logit_bias:
            if not 0 <= token < self.n_vocab:
                raise EngineRequestError(
                    f"logit_bias key {token} is not a token id of this model (ids run from 0 to {self.n_vocab - 1})",
                    param="logit_bias",
                )
        bad = next((t for t in request.prompt_tokens if not 0 <= t < self.n_vocab), None)
        if bad is not None:
            raise EngineRequestError(
                f"prompt holds token id {bad}, but this model's ids run from 0 to {self.n_vocab - 1}", param="prompt"
            )
        if request.constraint is None:
            if request.grammar is not None:
                self._grammars.check(request.grammar, param="grammar")
            return request
        from dataclasses import replace

        constraint = request.constraint
        if constraint.gbnf is None:
            return replace(request, grammar=self._grammars.gbnf(constraint))
        # A ready grammar (tool calls): built from the tools' schemas, so a grammar llama.cpp refuses is theirs.
        self._grammars.check(
            constraint.gbnf, param="tools", what="the tools' parameter schemas produced a grammar llama.cpp rejects"
        )
        # A marker the vocabulary holds as one token may be a special token, whose text would be dropped.
        preserved: list[int] = []
        for marker in constraint.markers:
            tokens = self._tokenize(marker, add_bos=False)
            if len(tokens) == 1:
                preserved.extend(tokens)
        return replace(request, grammar=constraint.gbnf, preserved_tokens=tuple(preserved))

    def close(self) -> None:
        if self._model:
            self._lc.llama_model_free(self._model)
            self._model = 0

    def _tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        lc = self._lc
        data = text.encode("utf-8")
        n_max = len(data) + 2
        buf = (lc.llama_token * n_max)()
        n = lc.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_bos, True)
        if n < 0:  # the buffer was too small; -n is the size needed
            buf = (lc.llama_token * -n)()
            n = lc.llama_tokenize(self._vocab, data, len(data), buf, -n, add_bos, True)
        if n < 0:
            raise EngineRequestError("the prompt could not be tokenized", param="prompt")
        return list(buf[:n])

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return token_piece(self._lc, self._vocab, token, True).decode("utf-8", errors="replace")
