"""Chat rendering with the target's own template and an assistant-only loss mask from the rendered spans.

The template is rendered with jinja2 the way Hugging Face ``apply_chat_template`` does (sandboxed immutable
environment, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``messages``, ``add_generation_prompt``,
``bos_token``/``eos_token``). The character span of every assistant message in the *rendered* text is found in
one of two ways, and mapped to tokens through the tokenizer's character offsets (a token is a training target
iff its first character lies inside an assistant span):

* templates with HF ``{% generation %}...{% endgeneration %}`` tags: the span is exactly the tagged text;
* other templates: each assistant content is wrapped in two Unicode noncharacters (U+FDD0/U+FDD1) before
  rendering, the markers are located and removed, and the span is extended over the end-of-turn token when the
  template emits it right after the content. The marked rendering, with the markers removed, must equal the
  plain rendering, so the markers cannot change the text.

**End of turn.** The end-of-turn tokens are read off the template itself: in the probe rendering (two
user/assistant exchanges, made when the renderer is built) the special token the template writes right after an
assistant's content (Gemma ``<end_of_turn>``, Llama 3 ``<|eot_id|>``, ChatML ``<|im_end|>``; ``eos_token``
where the template writes that). They are training targets (inside the span) and stop generation
(:func:`stop_token_ids`).

The role header (``<|im_start|>assistant\\n``) and everything the user or system wrote stay outside the mask.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import jinja2
import numpy as np
import tokenizers
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import decoders, models, pre_tokenizers

from dflash_jax.data.readers import Conversation

_OPEN, _CLOSE = "\ufdd0", "\ufdd1"
_MARGIN = 256  # characters kept after the last needed token when tokenizing a prefix (see ChatRenderer.encode)
_TEMPLATE_HELP = (
    "Supply a chat template whose rendering contains every assistant message verbatim (ideally with HF "
    "'{% generation %}...{% endgeneration %}' tags around the assistant text and its end-of-turn token): "
    "set data.chat_template to the path of a jinja file."
)


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML (the format of SmolLM2 and Qwen): used with :func:`byte_chat_tokenizer` for random targets."""
BYTE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def byte_chat_tokenizer() -> tokenizers.Tokenizer:
    """A byte-level tokenizer for random targets: ids 0..2 = ``<|endoftext|> <|im_start|> <|im_end|>``, then the
    256 bytes (vocab 259). Lossless on any UTF-8 text; no merges, so it needs no training data."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(BYTE_SPECIALS)}
    vocab.update({ch: len(BYTE_SPECIALS) + i for i, ch in enumerate(sorted(alphabet))})
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(BYTE_SPECIALS))
    return tok


class ChatTemplateError(ValueError):
    """The template itself is unusable (does not compile, or never renders assistant messages locatably)."""


class RenderError(ValueError):
    """One conversation cannot be rendered or masked (the data pipeline turns this into a counted skip)."""


class _GenerationTags(Extension):
    """HF's ``{% generation %}...{% endgeneration %}``: wraps the block's output in span markers."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _mark(caller):
        return _OPEN + caller() + _CLOSE


def _strip_markers(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """Remove the span markers; return the clean text and the ``[start, end)`` spans they enclosed."""
    pieces, spans, pos, opened = [], [], 0, None
    for i, piece in enumerate(re.split(f"([{_OPEN}{_CLOSE}])", marked)):
        if i % 2 == 0:
            pieces.append(piece)
            pos += len(piece)
        elif (piece == _OPEN) == (opened is not None):
            raise RenderError("unbalanced assistant span markers in the rendered text")
        elif piece == _OPEN:
            opened = pos
        else:
            spans.append((opened, pos))
            opened = None
    if opened is not None:
        raise RenderError("unbalanced assistant span markers in the rendered text")
    return "".join(pieces), spans


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _compile(chat_template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTags, "jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(chat_template)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}. {_TEMPLATE_HELP}") from e


def load_chat_template(path: str | os.PathLike | None, default: str | None) -> str:
    """The template text: the jinja file at ``path`` (config ``data.chat_template``) or else ``default``."""
    if path is not None:
        if not os.path.isfile(path):
            raise ValueError(f"data.chat_template {str(path)!r} is not a file")
        with open(path, encoding="utf-8") as f:
            return f.read()
    if not default:
        raise ChatTemplateError(f"the tokenizer has no chat template. {_TEMPLATE_HELP}")
    return default


class ChatRenderer:
    """Render conversations with ``chat_template`` and tokenize them with ``tokenizer``.

    ``render(conversation) -> (input_ids int32 [L], loss_mask float32 [L])`` where ``loss_mask[p] = 1`` marks the
    assistant tokens (content + end-of-turn) that are training targets (the reference's unshifted labels).
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        chat_template: str,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.end_of_turn: tuple[str, ...] = ()  # found by the probe below
        self._template = _compile(chat_template)
        self._tagged = re.search(r"{%-?\s*generation\s*-?%}", chat_template) is not None
        answers = ("Hi there.", "Because.")
        probe = (("user", "Hello"), ("assistant", answers[0]), ("user", "Why?"), ("assistant", answers[1]))
        try:
            text, spans = self.render_text(probe)
        except RenderError as e:
            raise ChatTemplateError(f"chat template fails on a plain user/assistant probe: {e}. {_TEMPLATE_HELP}")
        if len(spans) != 2 or any(a not in text[s:e] for a, (s, e) in zip(answers, spans)):
            raise ChatTemplateError(
                f"cannot locate the assistant spans in the rendered chat template output. {_TEMPLATE_HELP}"
            )
        self.end_of_turn = self._tokens_after(text, [text.index(a, s) + len(a) for a, (s, _) in zip(answers, spans)])

    def _tokens_after(self, text: str, ends: Sequence[int]) -> tuple[str, ...]:
        """The special tokens (added tokens marked special) that ``text`` has right at the offsets ``ends``."""
        special = {i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        found = []
        for enc in self.tokenizer.encode_batch([text[e:] for e in ends], add_special_tokens=False):
            if enc.ids and enc.ids[0] in special and enc.offsets[0][0] == 0:
                found.append(self.tokenizer.id_to_token(enc.ids[0]))
        return tuple(dict.fromkeys(found))

    @property
    def end_of_turn_ids(self) -> tuple[int, ...]:
        """Token ids of :attr:`end_of_turn`."""
        return tuple(self.tokenizer.token_to_id(t) for t in self.end_of_turn)

    @classmethod
    def from_target(cls, target: Any, chat_template_path: str | os.PathLike | None = None) -> "ChatRenderer":
        """Renderer for a loaded target (anything with ``tokenizer, chat_template, bos_token, eos_token``, e.g.
        ``models.target_io.Target``); ``chat_template_path`` (config ``data.chat_template``) overrides the
        template. A target without a tokenizer (``target.path: random``) gets :func:`byte_chat_tokenizer` and
        ChatML."""
        if getattr(target, "tokenizer", None) is None:
            return cls(
                byte_chat_tokenizer(), load_chat_template(chat_template_path, CHATML_TEMPLATE), eos_token="<|im_end|>"
            )
        return cls(
            target.tokenizer,
            load_chat_template(chat_template_path, target.chat_template),
            bos_token=target.bos_token,
            eos_token=target.eos_token,
        )

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except Exception as e:  # TemplateError (raise_exception, undefined, sandbox) or a template-side bug
            raise RenderError(f"chat template rejected the conversation: {type(e).__name__}: {e}") from e

    def render_text(self, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the ``[start, end)`` character span of every assistant message in it."""
        if any(_OPEN in text or _CLOSE in text for _, text in conversation):
            raise RenderError("message text contains the reserved characters U+FDD0/U+FDD1")
        plain = [{"role": r, "content": t} for r, t in conversation]
        if self._tagged:
            marked_text = self._render(plain, False)
        else:
            marked = [{"role": r, "content": _OPEN + t + _CLOSE if r == "assistant" else t} for r, t in conversation]
            marked_text = self._render(marked, False)
        text, spans = _strip_markers(marked_text)
        if not self._tagged:
            if text != self._render(plain, False):
                raise RenderError("the template renders assistant content differently when it is marked")
            ends = self.end_of_turn + ((self.eos_token,) if self.eos_token else ())
            spans = [next(((s, e + len(t)) for t in ends if text.startswith(t, e)), (s, e)) for s, e in spans]
        n_assistant = sum(r == "assistant" for r, _ in conversation)
        if len(spans) != n_assistant and not self._tagged:
            raise RenderError(f"found {len(spans)} assistant spans for {n_assistant} assistant messages")
        if not any(e > s for s, e in spans):
            raise RenderError("the rendered text has no assistant span")
        return text, spans

    def _mask(self, offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
        starts = np.fromiter((a for a, _ in offsets), dtype=np.int64, count=len(offsets))
        mask = np.zeros(len(offsets), np.float32)
        for s, e in spans:
            mask[(starts >= s) & (starts < e)] = 1.0
        return mask

    def encode(
        self, texts: list[str], spans: list[list[tuple[int, int]]], max_tokens: int | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Batch-tokenize rendered ``texts`` (no added specials) → ``(input_ids int32, loss_mask f32)`` each,
        truncated to ``max_tokens``.

        With ``max_tokens`` only a prefix of each text is tokenized (``6*max_tokens + 256`` characters); a text
        whose prefix does not yield ``max_tokens`` tokens ending at least ``_MARGIN`` characters before the cut is
        re-tokenized whole, so the result equals tokenizing everything and truncating.
        """
        cut = None if max_tokens is None else 6 * max_tokens + _MARGIN
        encs = self.tokenizer.encode_batch([t[:cut] for t in texts], add_special_tokens=False)
        if cut is not None:
            redo = [
                i
                for i, (t, e) in enumerate(zip(texts, encs))
                if len(t) > cut and not (len(e.ids) > max_tokens and e.offsets[max_tokens][1] <= cut - _MARGIN)
            ]
            for i, e in zip(redo, self.tokenizer.encode_batch([texts[i] for i in redo], add_special_tokens=False)):
                encs[i] = e
        return [
            (np.asarray(e.ids[:max_tokens], np.int32), self._mask(e.offsets[:max_tokens], sp))
            for e, sp in zip(encs, spans)
        ]

    def render(self, conversation: Conversation) -> tuple[np.ndarray, np.ndarray]:
        """``conversation`` → ``(input_ids int32 [L], loss_mask float32 [L])``; RenderError if unusable."""
        text, spans = self.render_text(conversation)
        return self.encode([text], [spans])[0]

    def render_prompt(self, conversation_prefix: Conversation) -> np.ndarray:
        """Token ids (int32 [L]) of ``conversation_prefix`` followed by the assistant generation prompt."""
        text = self._render([{"role": r, "content": t} for r, t in conversation_prefix], True)
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)


def stop_token_ids(target: Any, renderer: ChatRenderer) -> tuple[int, ...]:
    """Where generation for ``target`` (``eos_token_ids``, ``config.vocab_size``) stops, sorted: its EOS ids, the
    renderer's end-of-turn tokens (:attr:`ChatRenderer.end_of_turn_ids`) and ``eos_token``, within the vocab."""
    named = renderer.end_of_turn + ((renderer.eos_token,) if renderer.eos_token else ())
    ids = {int(i) for i in target.eos_token_ids}
    ids |= {i for i in map(renderer.tokenizer.token_to_id, named) if i is not None}
    return tuple(sorted(i for i in ids if i < target.config.vocab_size))
