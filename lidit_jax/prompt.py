"""Prompt tokenization for LI-DiT: instruction + chat template + a mask of the user-prompt tokens.

LI-DiT feeds the LLM "<system: instruction> <user: prompt>" in the model's own chat format. Everything
except the prompt tokens (instruction, template scaffolding, padding) is masked out downstream, so
besides `input_ids` / `attention_mask` we emit `prompt_mask`. Outputs are padded to a fixed
`max_length` because shapes must be static under jit.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import transformers
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

logger = logging.getLogger(__name__)
_WARNED_UNKNOWN: set = set()

LIDIT_INSTRUCTION = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "and spatial relationships of the objects:"
)

_BASE_SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# Same shape as real LLM templates (bos, one block per turn, generation prompt) so the word tokenizer
# exercises the exact code path of a real chat model.
WORD_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Rendered in place of the user prompt to locate it inside the chat template's output.
_SENTINEL = "LIDITPROMPTSENTINEL7c1f"
# Llama-3.2-style templates stamp today's date (strftime_now) into the system turn unless date_string is
# given; pin it so the prefix (and thus the text embeddings) do not change from day to day.
_TEMPLATE_KWARGS = {"date_string": "26 Jul 2024"}


def _word_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])


def build_word_tokenizer(
    words: Iterable[str], out_dir: str | os.PathLike | None = None
) -> transformers.PreTrainedTokenizerFast:
    """A lower-cased word-level tokenizer over `words` (+ the LI-DiT instruction) with a chat template.

    Each entry of `words` is split like the tokenizer splits text, so whole captions may be passed. Ids are
    deterministic: the 8 special tokens first (<pad>=0, <unk>=1, <bos>=2, <eos>=3, role markers 4..7), then
    the sorted vocabulary. Plain encoding prepends <bos>, like Llama tokenizers do.
    """
    normalizer = normalizers.Lowercase()
    pre_tokenizer = _word_pre_tokenizer()
    specials = _BASE_SPECIALS + _ROLE_TOKENS
    vocab_words: set[str] = set()
    for text in [*words, LIDIT_INSTRUCTION]:
        vocab_words.update(p for p, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = {tok: i for i, tok in enumerate([*specials, *sorted(vocab_words - set(specials))])}

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    # normalized=False: match the markers on the raw text, before lower-casing touches it.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=list(_ROLE_TOKENS),
        add_bos_token=True,
        chat_template=WORD_CHAT_TEMPLATE,
        # WordLevel decodes by joining with spaces; this glues punctuation back ("cat , dog" -> "cat, dog").
        clean_up_tokenization_spaces=True,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(os.fspath(out_dir))
    return tokenizer


def load_tokenizer(spec: str, extra_words: Iterable[str] = ()) -> transformers.PreTrainedTokenizerBase:
    """"words" -> `build_word_tokenizer(extra_words)`; otherwise a local tokenizer directory (never the hub)."""
    if spec == "words":
        tokenizer = build_word_tokenizer(extra_words)
    else:
        path = os.path.expanduser(os.fspath(spec))
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"Tokenizer spec {spec!r} is neither 'words' nor an existing local directory. Point it at a "
                "directory holding tokenizer files (tokenizer.json / tokenizer_config.json); the Hugging Face "
                "hub is never contacted."
            )
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:  # transformers raises OSError/ValueError/KeyError depending on what is missing
            raise OSError(
                f"Could not load a tokenizer from {path!r} (expected tokenizer.json and/or "
                f"tokenizer_config.json there): {type(e).__name__}: {e}"
            ) from e
    if tokenizer.pad_token is None:
        # Pads are masked out, so any existing token works; decoder-only LLMs often ship without one.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"Tokenizer {spec!r} has no pad, eos or unk token to pad with.")
        tokenizer.pad_token = fallback
    return tokenizer


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _shorten(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


@dataclasses.dataclass
class PromptEncoder:
    """Turns prompts into fixed-length `input_ids`, `attention_mask` and `prompt_mask` (all int32 [B, L]).

    With a chat template the instruction is the system turn and the prompt the user turn (followed by the
    generation prompt); without one the text is "instruction prompt" plus whatever special tokens the
    tokenizer adds itself (bos for Llama-likes, eos for T5-likes). Prompts are stripped of surrounding
    whitespace (chat templates such as Llama-3's trim them anyway). Over-long prompts are truncated, never
    the instruction or template. Results are cached per prompt (LRU, `cache_size` entries; 0 disables).
    """

    tokenizer: Any
    max_length: int
    instruction: str | None = LIDIT_INSTRUCTION
    use_chat_template: bool = True
    padding_side: str = "right"
    cache_size: int = 1 << 16
    mask_padding: bool = True  # False: every position valid, padding included (SD pipelines run CLIP so)
    lowercase: bool = False  # lower-case every prompt first (PixArt's pipelines do)
    separator: str = " "  # without a chat template: the text between instruction and prompt
    # "first_and_last" (Sana's): the text runs to (instruction tokens + max_length - 2) tokens, and the features keep
    # the first token and the last max_length - 1 (`select`); "all": every one of max_length tokens
    selection: str = "all"
    instruct_negatives: bool = True  # False: negative prompts (and the empty prompt) are encoded bare (Sana, Lumina 2)

    def __post_init__(self):
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.max_length <= 0:
            raise ValueError(f"max_length must be positive, got {self.max_length}")
        if self.selection not in ("all", "first_and_last"):
            raise ValueError(f"selection must be 'all' or 'first_and_last', got {self.selection!r}")
        if self.selection != "all" and self.padding_side != "right":
            raise ValueError(f"selection={self.selection!r} keeps the last tokens of right-padded text. Fix: "
                             "padding_side='right'")
        tok = self.tokenizer
        pad_id = tok.pad_token_id
        if pad_id is None:
            pad_id = tok.eos_token_id if tok.eos_token_id is not None else tok.unk_token_id
        if pad_id is None:
            raise ValueError("Tokenizer has no pad, eos or unk token; load it with load_tokenizer() or set one.")
        self.pad_id = int(pad_id)

        self.uses_chat_template = bool(self.use_chat_template and getattr(tok, "chat_template", None))
        if self.uses_chat_template:
            self.prefix, self.suffix = self._render_scaffold()
        else:
            self.prefix, self.suffix = (f"{self.instruction}{self.separator}" if self.instruction else ""), ""
        # Rendered templates already hold bos etc.; only the plain path lets the tokenizer add its own.
        self._add_special_tokens = not self.uses_chat_template
        # Both paths tokenize the whole string at once (exactly what the LLM would see). Fast tokenizers give
        # character offsets to find the prompt tokens; others compare against tokenizing text prefixes.
        self._use_offsets = bool(getattr(tok, "is_fast", False))
        self._lead, self._trail = self._added_special_ids() if self._add_special_tokens else ([], [])
        self._prefix_ids = self.tokenizer.encode(self.prefix, add_special_tokens=False) if self.prefix else []

        # tokens the tower reads: max_length, or (selection) the instruction's with its special tokens besides
        self.token_length = self.max_length
        if self.selection == "first_and_last" and self.instruction:
            self.token_length += len(self.tokenizer.encode(self.instruction)) - 2
        pre, _, post = self._split_ids("")
        self.num_template_tokens = len(pre) + len(post)
        if self.num_template_tokens >= self.token_length:
            raise ValueError(
                f"max_length={self.max_length} leaves no room for the prompt: the instruction and chat-template "
                f"scaffolding alone take {self.num_template_tokens} tokens. Raise max_length above "
                f"{self.num_template_tokens} (or shorten / disable the instruction)."
            )
        self._cache: collections.OrderedDict[str, tuple[np.ndarray, int, int]] = collections.OrderedDict()
        self._warned: set[str] = set()

    def _render_scaffold(self) -> tuple[str, str]:
        """Render the chat template around a sentinel user turn and return the text before / after it."""
        def render(messages):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **_TEMPLATE_KWARGS
            )

        user = {"role": "user", "content": _SENTINEL}
        if self.instruction:
            try:
                text = render([{"role": "system", "content": self.instruction}, user])
                if self.instruction not in text:
                    raise ValueError("chat template silently dropped the system turn")
            except Exception as e:  # e.g. Gemma-style templates raise "System role not supported"
                logger.info("Chat template has no usable system turn (%s); instruction goes in the user turn.", e)
                text = render([{"role": "user", "content": f"{self.instruction}\n\n{_SENTINEL}"}])
        else:
            text = render([user])
        if text.count(_SENTINEL) != 1:
            raise ValueError(f"Chat template must render the user message exactly once, got: {text!r}")
        prefix, suffix = text.split(_SENTINEL)
        return prefix, suffix

    def _added_special_ids(self) -> tuple[list[int], list[int]]:
        """Ids the tokenizer itself puts before / after a text (bos / eos), for the piecewise path."""
        bare = self.tokenizer.encode("a", add_special_tokens=False)
        full = self.tokenizer.encode("a", add_special_tokens=True)
        for i in range(len(full) - len(bare) + 1):
            if full[i : i + len(bare)] == bare:
                return full[:i], full[i + len(bare) :]
        return [], []

    def _split_ids(self, prompt: str) -> tuple[list[int], list[int], list[int]]:
        """Token ids of the full text, split into (before prompt, prompt, after prompt)."""
        if not self._use_offsets:
            return self._split_ids_piecewise(prompt)
        text = self.prefix + prompt + self.suffix
        start, end = len(self.prefix), len(self.prefix) + len(prompt)
        enc = self.tokenizer(
            text,
            add_special_tokens=self._add_special_tokens,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            return_attention_mask=False,
        )
        ids = list(enc["input_ids"])
        in_prompt = [
            not special and (s < end and e > start if e > s else start <= s < end)
            for (s, e), special in zip(enc["offset_mapping"], enc["special_tokens_mask"])
        ]
        if not any(in_prompt):  # empty prompt (e.g. the CFG null caption): only the template is left
            return ids, [], []
        first = in_prompt.index(True)
        last = len(in_prompt) - 1 - in_prompt[::-1].index(True)
        # A token straddling the boundary (e.g. BPE's " a" after a prefix ending in a space) counts as prompt.
        return ids[:first], ids[first : last + 1], ids[last + 1 :]

    def _split_ids_piecewise(self, prompt: str) -> tuple[list[int], list[int], list[int]]:
        """Like `_split_ids` without offsets: the ids are still those of the whole text, and the prompt
        boundaries are where tokenizing prefix / prefix+prompt stops agreeing with the whole text."""
        def enc(text):
            return self.tokenizer.encode(text, add_special_tokens=False) if text else []

        full = enc(self.prefix + prompt + self.suffix)
        if not prompt:
            return self._lead + full + self._trail, [], []
        head = enc(self.prefix + prompt)
        p0 = _common_prefix_len(self._prefix_ids, full)
        p1 = _common_prefix_len(head, full)
        if p1 < len(head):
            p1 += 1  # a token merged across the prompt/suffix boundary counts as prompt
        p1 = max(p0, min(p1, len(full)))
        return self._lead + full[:p0], full[p0:p1], full[p1:] + self._trail

    def _unknown_words(self, prompt: str) -> list[str]:
        """The prompt's words that the tokenizer can only read as its unknown token (word-level vocabularies
        such as the demo's; byte-level BPE tokenizers have none)."""
        tok = self.tokenizer
        if tok.unk_token_id is None or not tok.is_fast:
            return []
        enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
        return [prompt[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == tok.unk_token_id]

    def _encode_one(self, prompt: str) -> tuple[np.ndarray, int, int]:
        pre, mid, post = self._split_ids(prompt)
        unknown = self._unknown_words(prompt) if self.tokenizer.unk_token_id in mid else []
        if unknown and (prompt, tuple(unknown)) not in _WARNED_UNKNOWN:  # once, not once per tower
            _WARNED_UNKNOWN.add((prompt, tuple(unknown)))
            logger.warning("Prompt %r: the tokenizer does not know %s; %s read as its unknown token %r (the "
                           "model sees no meaning in them). Fix: use the vocabulary it was trained with.",
                           _shorten(prompt), ", ".join(repr(w) for w in dict.fromkeys(unknown)),
                           "it is" if len(set(unknown)) == 1 else "they are", self.tokenizer.unk_token)
        room = self.token_length - len(pre) - len(post)
        if room <= 0:  # template tokenized differently around this prompt; __post_init__ checked the usual case
            raise ValueError(
                f"max_length={self.max_length} leaves no room for prompt {_shorten(prompt)!r}: the instruction "
                f"and template take {len(pre) + len(post)} tokens around it. Raise max_length."
            )
        if len(mid) > room:
            if prompt not in self._warned:
                self._warned.add(prompt)
                logger.warning(
                    "Prompt %r has %d tokens but max_length=%d leaves room for only %d after the %d "
                    "instruction/template tokens; truncating the prompt. Raise max_length to at least %d "
                    "to keep it whole.",
                    _shorten(prompt), len(mid), self.token_length, room, len(pre) + len(post),
                    len(pre) + len(mid) + len(post),
                )
            mid = mid[:room]
        ids = np.asarray(pre + mid + post, dtype=np.int32)
        return ids, len(pre), len(pre) + len(mid)

    def _lookup(self, prompt: str) -> tuple[np.ndarray, int, int]:
        hit = self._cache.get(prompt)
        if hit is not None:
            self._cache.move_to_end(prompt)
            return hit
        out = self._encode_one(prompt)
        if self.cache_size > 0:
            self._cache[prompt] = out
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out

    def __call__(self, prompts: Sequence[str] | str, negative: bool = False) -> dict[str, np.ndarray]:
        """The text inputs of `prompts` (`negative`: as negative prompts: bare unless `instruct_negatives`). With
        `selection` also `token_mask` (the tower's, [B, token_length]) and `select` ([B, max_length]: the token
        positions the features keep); `attention_mask` and `prompt_mask` are then those of the kept positions."""
        if isinstance(prompts, (str, bytes)):
            prompts = [prompts]
        if negative and self.instruction and not self.instruct_negatives:
            return self._bare(prompts)
        out = self._encode(prompts, self.token_length)
        if self.selection == "all":
            return out
        keep = np.r_[0, self.token_length - self.max_length + 1 : self.token_length]
        return {"input_ids": out["input_ids"], "token_mask": out["attention_mask"],
                "attention_mask": out["attention_mask"][:, keep], "prompt_mask": out["prompt_mask"][:, keep],
                "select": np.broadcast_to(keep.astype(np.int32), (len(prompts), self.max_length)).copy()}

    def _bare(self, prompts) -> dict[str, np.ndarray]:
        """Negative prompts without the instruction: max_length tokens, shaped as the prompts' inputs."""
        if not hasattr(self, "_bare_encoder"):
            self._bare_encoder = dataclasses.replace(self, instruction=None, selection="all")
        out = self._bare_encoder(prompts)
        if self.selection == "all":
            return out
        pad = lambda a, v: np.pad(a, ((0, 0), (0, self.token_length - self.max_length)), constant_values=v)
        return {**out, "input_ids": pad(out["input_ids"], self.pad_id), "token_mask": pad(out["attention_mask"], 0),
                "select": np.broadcast_to(np.arange(self.max_length, dtype=np.int32), out["input_ids"].shape).copy()}

    def _encode(self, prompts, length: int) -> dict[str, np.ndarray]:
        batch = len(prompts)
        input_ids = np.full((batch, length), self.pad_id, dtype=np.int32)
        attention_mask = np.zeros((batch, length), dtype=np.int32)
        prompt_mask = np.zeros((batch, length), dtype=np.int32)
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, (bytes, np.bytes_)):  # captions from tf.data / grain arrive as bytes
                prompt = prompt.decode("utf-8")
            prompt = str(prompt).strip()
            ids, p0, p1 = self._lookup(prompt.lower() if self.lowercase else prompt)
            off = 0 if self.padding_side == "right" else length - len(ids)
            input_ids[i, off : off + len(ids)] = ids
            attention_mask[i, off : off + len(ids)] = 1
            prompt_mask[i, off + p0 : off + p1] = 1
        if not self.mask_padding:
            attention_mask[:], prompt_mask[:] = 1, 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_mask": prompt_mask}
