"""Tests for lidit_jax.prompt: word tokenizer, chat-template prompt masks, padding, truncation, BPE/Unigram."""
import logging

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lidit_jax.prompt import (
    LIDIT_INSTRUCTION,
    PromptEncoder,
    build_word_tokenizer,
    load_tokenizer,
)

WORDS = ["a red cat sitting on a blue mat", "two dogs, one ball", "the text 'hello' on a sign"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "a red cat sitting on a blue mat", "the quick brown fox jumps over the lazy dog",
    "two dogs playing with one ball in the park", "a photo of a sign that says hello world",
    LIDIT_INSTRUCTION, "system user assistant",
] * 5
BPE_PROMPTS = [
    "a red cat sitting on a blue mat",
    "Two dogs, one ball!",
    "  a zebra   with 3 stripes  ",  # unseen word, digits, inner runs of spaces
    "café crème — naïve 🐱 emoji",  # multi-byte characters split into byte tokens
    "\"quoted\" text: (parens) and a-hyphen",
]


def _rows(out, i):
    attn = out["attention_mask"][i].astype(bool)
    pm = out["prompt_mask"][i].astype(bool)
    return out["input_ids"][i], attn, pm


@pytest.fixture(scope="module")
def word_tok():
    return build_word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def bpe_backend():
    """A small byte-level BPE (GPT-2 / Llama-3 / Qwen family), trained in memory."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def chatml_tok(bpe_backend):
    # Qwen-style: chat template, eos but no pad (load_tokenizer / PromptEncoder must cope).
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe_backend, eos_token="<|im_end|>", chat_template=CHATML
    )


# ----------------------------------------------------------------------------- word tokenizer


def test_word_tokenizer_round_trip_and_deterministic(tmp_path, word_tok):
    again = build_word_tokenizer(list(reversed(WORDS)), out_dir=tmp_path)
    assert again.get_vocab() == word_tok.get_vocab()
    assert word_tok.convert_tokens_to_ids(["<pad>", "<unk>", "<bos>", "<eos>"]) == [0, 1, 2, 3]
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.get_vocab() == word_tok.get_vocab()
    assert loaded.chat_template == word_tok.chat_template
    assert loaded.pad_token == "<pad>"
    text = "A Red cat, on a mat with a zebra"
    assert loaded(text)["input_ids"] == word_tok(text)["input_ids"]
    assert word_tok(text)["input_ids"][0] == word_tok.bos_token_id
    assert word_tok.unk_token_id in word_tok(text)["input_ids"]  # "zebra" is out of vocabulary
    msgs = [{"role": "user", "content": "a cat"}]
    assert loaded.apply_chat_template(msgs, tokenize=False) == word_tok.apply_chat_template(msgs, tokenize=False)
    # load_tokenizer accepts the saved directory and the "words" spec.
    assert load_tokenizer(str(tmp_path)).get_vocab() == word_tok.get_vocab()
    assert "zebra" in load_tokenizer("words", extra_words=["a zebra"]).get_vocab()


def test_load_tokenizer_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(str(missing))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(OSError, match="empty_dir"):
        load_tokenizer(str(empty))


def test_load_tokenizer_pads_with_eos(tmp_path, chatml_tok):
    assert chatml_tok.pad_token is None
    chatml_tok.save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token == "<|im_end|>" and tok.pad_token_id == chatml_tok.eos_token_id


# ----------------------------------------------------------------------------- masks


def test_masks_word_tokenizer(word_tok):
    enc = PromptEncoder(word_tok, max_length=48)
    prompts = ["A red cat sitting on a blue mat", "two dogs, one ball", ""]
    out = enc(prompts)
    assert set(out) == {"input_ids", "attention_mask", "prompt_mask"}
    for v in out.values():
        assert v.shape == (3, 48) and v.dtype == np.int32
    instr_ids = word_tok(LIDIT_INSTRUCTION, add_special_tokens=False)["input_ids"]
    system_id = word_tok.convert_tokens_to_ids("<|system|>")
    for i, prompt in enumerate(prompts):
        ids, attn, pm = _rows(out, i)
        assert not (pm & ~attn).any()  # prompt_mask is a subset of attention_mask
        assert word_tok.decode(ids[pm]) == prompt.lower()
        assert (ids[~attn] == word_tok.pad_token_id).all()
        # Instruction tokens are there, contiguous, and masked out.
        real = list(ids[attn])
        at = real.index(system_id) + 1
        assert real[at : at + len(instr_ids)] == instr_ids
        assert not pm[at : at + len(instr_ids)].any()
    # Whole row equals the chat template tokenized in one go.
    msgs = [{"role": "system", "content": LIDIT_INSTRUCTION}, {"role": "user", "content": prompts[0]}]
    full = word_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids, attn, _ = _rows(out, 0)
    assert list(ids[attn]) == list(full)
    # Same for both the offsets and the piecewise path, for more prompts.
    def render(prompt):
        msgs = [{"role": "system", "content": LIDIT_INSTRUCTION}, {"role": "user", "content": prompt}]
        return word_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)

    _check_exact(word_tok, enc, [p.lower() for p in prompts[:2]] + ["the text hello, on a sign"], render)


@pytest.mark.parametrize("instruction", [None, ""])
def test_no_instruction(word_tok, instruction):
    enc = PromptEncoder(word_tok, max_length=24, instruction=instruction)
    out = enc(["a red cat"])
    ids, attn, pm = _rows(out, 0)
    assert word_tok.convert_tokens_to_ids("<|system|>") not in ids
    assert word_tok.convert_tokens_to_ids("describe") not in ids
    assert word_tok.decode(ids[pm]) == "a red cat"
    assert word_tok.convert_ids_to_tokens(ids[attn].tolist()) == [
        "<bos>", "<|user|>", "a", "red", "cat", "<|end|>", "<|assistant|>"]


def test_left_vs_right_padding(word_tok):
    prompts = ["a red cat", "two dogs, one ball on a blue mat", ""]
    right = PromptEncoder(word_tok, max_length=50, padding_side="right")(prompts)
    left = PromptEncoder(word_tok, max_length=50, padding_side="left")(prompts)
    for i in range(len(prompts)):
        r_ids, r_attn, r_pm = _rows(right, i)
        l_ids, l_attn, l_pm = _rows(left, i)
        n = int(r_attn.sum())
        assert r_attn[:n].all() and not r_attn[n:].any()
        assert l_attn[-n:].all() and not l_attn[:-n].any()
        np.testing.assert_array_equal(r_ids[:n], l_ids[-n:])
        np.testing.assert_array_equal(r_pm[:n], l_pm[-n:])
        np.testing.assert_array_equal(np.roll(right["prompt_mask"][i], 50 - n), left["prompt_mask"][i])
        assert (l_ids[:-n] == word_tok.pad_token_id).all()
    with pytest.raises(ValueError, match="padding_side"):
        PromptEncoder(word_tok, max_length=50, padding_side="middle")


def test_cache_and_bytes_input(word_tok):
    enc = PromptEncoder(word_tok, max_length=48, cache_size=2)
    a = enc(["a red cat", b"a red cat", "  a red cat "])
    np.testing.assert_array_equal(a["input_ids"][0], a["input_ids"][1])
    np.testing.assert_array_equal(a["input_ids"][0], a["input_ids"][2])
    enc(["two dogs", "one ball", "a blue mat"])
    assert len(enc._cache) == 2  # LRU-bounded
    single = enc("a red cat")
    np.testing.assert_array_equal(single["input_ids"][0], a["input_ids"][0])


# ----------------------------------------------------------------------------- truncation


def test_truncation_keeps_template_and_warns_once(word_tok, caplog):
    enc = PromptEncoder(word_tok, max_length=40)
    room = 40 - enc.num_template_tokens
    long_prompt = " ".join(["a red cat sitting on a blue mat"] * 4)
    full = PromptEncoder(word_tok, max_length=200)([long_prompt])
    with caplog.at_level(logging.WARNING, logger="lidit_jax.prompt"):
        out = enc([long_prompt, "a red cat"])
        enc([long_prompt])  # served from the cache: no second warning
        enc._cache.clear()
        enc([long_prompt])  # recomputed: still warned only once
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "a red cat sitting" in msg and "max_length=40" in msg and "Raise max_length" in msg
    assert str(int(full["prompt_mask"][0].sum())) in msg  # the prompt's token count

    ids, attn, pm = _rows(out, 0)
    assert attn.all() and pm.sum() == room
    f_ids, f_attn, f_pm = _rows(full, 0)
    first = int(np.argmax(f_pm))
    n_suffix = int(f_attn.sum()) - first - int(f_pm.sum())
    np.testing.assert_array_equal(ids[:first], f_ids[:first])  # prefix (bos, system turn, ...) kept
    np.testing.assert_array_equal(ids[first : first + room], f_ids[first : first + room])  # prompt head
    np.testing.assert_array_equal(ids[-n_suffix:], f_ids[first + int(f_pm.sum()) : int(f_attn.sum())])
    assert word_tok.convert_ids_to_tokens(ids[-2:].tolist()) == ["<|end|>", "<|assistant|>"]


def test_max_length_too_small_raises(word_tok):
    n = PromptEncoder(word_tok, max_length=64).num_template_tokens
    with pytest.raises(ValueError, match=rf"max_length={n}.*{n} tokens.*Raise max_length"):
        PromptEncoder(word_tok, max_length=n)
    PromptEncoder(word_tok, max_length=n + 1)  # one prompt token fits


# ----------------------------------------------------------------------------- real-tokenizer shapes


def _check_exact(tok, enc, prompts, render, lead_space=False):
    """Prompt mask decodes to the prompt, and ids equal tokenizing the whole rendered text at once.

    lead_space: byte-level BPE merges the space before the prompt into its first token ("Ġa").
    Checked for both the offsets path (fast tokenizers) and the piecewise one (used when offsets are missing).
    """
    for use_offsets in (True, False):
        enc._use_offsets = use_offsets
        enc._cache.clear()
        _check_exact_once(tok, enc, prompts, render, lead_space)
    enc._use_offsets = True


def _check_exact_once(tok, enc, prompts, render, lead_space):
    out = enc(prompts)
    for i, prompt in enumerate(prompts):
        ids, attn, pm = _rows(out, i)
        assert pm.any() and not (pm & ~attn).any()
        text = tok.decode(ids[pm])
        if lead_space and text.startswith(" "):
            text = text[1:]
        assert text == prompt.strip(), (prompt, tok.convert_ids_to_tokens(ids[pm].tolist()))
        assert list(ids[attn]) == render(prompt.strip()), prompt


def test_bpe_chatml(chatml_tok):
    enc = PromptEncoder(chatml_tok, max_length=160)
    assert enc.pad_id == chatml_tok.eos_token_id  # no pad token: falls back to eos

    def render(prompt):
        msgs = [{"role": "system", "content": LIDIT_INSTRUCTION}, {"role": "user", "content": prompt}]
        text = chatml_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
        return chatml_tok(text, add_special_tokens=False)["input_ids"]

    _check_exact(chatml_tok, enc, BPE_PROMPTS, render)


def test_bpe_prompt_after_space(bpe_backend):
    """A template that puts the prompt right after a space: BPE merges the space into the prompt's first token."""
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe_backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant:{% endif %}",
    )
    enc = PromptEncoder(tok, max_length=160)
    render = lambda p: tok(f"system: {LIDIT_INSTRUCTION}\nuser: {p}\nassistant:")["input_ids"]
    _check_exact(tok, enc, BPE_PROMPTS, render, lead_space=True)


def test_template_without_system_role(bpe_backend):
    """Gemma-style templates reject system turns: the instruction moves into the user turn, still masked."""
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe_backend, eos_token="<|im_end|>", chat_template=template)
    enc = PromptEncoder(tok, max_length=160)
    assert LIDIT_INSTRUCTION in enc.prefix and "system" not in enc.prefix

    def render(prompt):
        msgs = [{"role": "user", "content": f"{LIDIT_INSTRUCTION}\n\n{prompt}"}]
        return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)

    _check_exact(tok, enc, BPE_PROMPTS, render)


def test_no_chat_template_llama_like(bpe_backend):
    """Base LLM without a template (adds bos itself): plain "instruction prompt" with the tokenizer's bos."""
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe_backend, bos_token="<|begin_of_text|>", eos_token="<|endoftext|>",
        add_bos_token=True)
    assert tok.chat_template is None
    assert tok("a cat")["input_ids"][0] == tok.bos_token_id
    enc = PromptEncoder(tok, max_length=160)
    assert not enc.uses_chat_template
    _check_exact(tok, enc, BPE_PROMPTS, lambda p: tok(f"{LIDIT_INSTRUCTION} {p}")["input_ids"], lead_space=True)
    out = enc(["a red cat"])
    assert out["input_ids"][0, 0] == tok.bos_token_id and out["prompt_mask"][0, 0] == 0
    # instruction=None: bos + prompt; bos (offset 0, like the prompt) must still be masked out.
    bare = PromptEncoder(tok, max_length=32, instruction=None)
    _check_exact(tok, bare, BPE_PROMPTS[:2], lambda p: tok(p)["input_ids"])
    # use_chat_template=False ignores an existing template.
    templated = PromptEncoder(
        transformers.PreTrainedTokenizerFast(tokenizer_object=bpe_backend, eos_token="<|im_end|>",
                                             chat_template=CHATML),
        max_length=160, use_chat_template=False)
    assert not templated.uses_chat_template and templated.prefix == LIDIT_INSTRUCTION + " "


def test_no_chat_template_t5_like():
    """SentencePiece-like Unigram + Metaspace tokenizer that appends </s> (T5): eos kept, mask exact."""
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    backend.train_from_iterator(CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", backend.token_to_id("</s>"))])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    enc = PromptEncoder(tok, max_length=128)
    prompts = ["a red cat sitting on a blue mat", "two dogs, one ball", "a zebra"]
    _check_exact(tok, enc, prompts, lambda p: tok(f"{LIDIT_INSTRUCTION} {p}")["input_ids"])
    out = enc(prompts)
    for i in range(len(prompts)):
        ids, attn, pm = _rows(out, i)
        assert ids[attn][-1] == tok.eos_token_id and not pm[attn][-1]


def test_sana_selection_and_bare_negatives(word_tok):
    """Sana's text side as SanaPipeline builds it with the same tokenizer: the instruction joined to the lower-cased
    prompt with nothing between, padded to (instruction tokens + max_length - 2), position 0 and the last
    max_length - 1 kept; a negative prompt without the instruction in max_length tokens."""
    instruction, n = "describe the objects: user prompt: ", 12
    enc = PromptEncoder(word_tok, n, instruction, use_chat_template=False, lowercase=True, separator="",
                                            selection="first_and_last", instruct_negatives=False)
    chi = len(word_tok.encode(instruction))
    assert enc.token_length == chi + n - 2
    out = enc(["A Red circle", "a blue square left of a green triangle"])
    want = word_tok([instruction + p for p in ("a red circle", "a blue square left of a green triangle")],
                                    padding="max_length", max_length=chi + n - 2, truncation=True)
    np.testing.assert_array_equal(out["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(out["token_mask"], want["attention_mask"])
    keep = [0, *range(chi + n - 2 - (n - 1), chi + n - 2)]
    np.testing.assert_array_equal(out["select"], [keep, keep])
    np.testing.assert_array_equal(out["attention_mask"], np.asarray(want["attention_mask"])[:, keep])
    assert out["prompt_mask"].sum(1).tolist() == [3, 8]  # the prompt's words, among the kept positions
    neg = enc(["Green", ""], negative=True)
    bare = word_tok(["green", ""], padding="max_length", max_length=n, truncation=True)
    np.testing.assert_array_equal(neg["input_ids"][:, :n], bare["input_ids"])
    assert neg["input_ids"].shape == out["input_ids"].shape and (neg["token_mask"][:, n:] == 0).all()
    np.testing.assert_array_equal(neg["select"], [list(range(n))] * 2)
    np.testing.assert_array_equal(neg["attention_mask"], bare["attention_mask"])
    np.testing.assert_array_equal(enc(["green"])["input_ids"], enc(["green"], negative=False)["input_ids"])
    with pytest.raises(ValueError, match="padding_side='right'"):
        PromptEncoder(word_tok, n, instruction, use_chat_template=False, selection="first_and_last",
                      padding_side="left")
