"""Text towers that know the shapes demo's language, made here (issue 17): a small decoder-only LM pretrained by
next-token prediction, its instruction-tuned variant, and a small T5-style encoder pretrained by span corruption,
on the caption corpus of `experiments/corpus.py`; saved as Hugging Face checkpoints with their tokenizers, so they
go through the same converters as any downloaded model.

  pip install -e ".[study]"      # PyTorch (a CPU build) trains them: transformers' own Llama and T5 classes
  python -m lidit_jax.experiments.pretrain_towers --out checkpoints/pretrained [--steps 1500] [--quick]

OUT/lm (LlamaForCausalLM, the demo's word tokenizer over the corpus; a base LM, so no chat template), OUT/lm_b
(another such LM, 3/4 the width, another seed: a second tower), OUT/lm_instruct (the LM tuned on chat turns: the
system turn one of the corpus's instructions, the user turn a description, the answer another description of the
same scene; its tokenizer has the chat template), OUT/t5 (T5EncoderModel, its own word tokenizer with </s> and
sentinels; trained with a decoder, which is dropped) and OUT/report.json: per tower the held-out loss (descriptions
of the demo's held-out compositions) before and after training, its parameters and seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

from lidit_jax import prompt
from lidit_jax.experiments import corpus

SIZES = {"full": dict(hidden=128, layers=4, heads=4, ff=384, steps=1500, batch=64, length=64),
         "quick": dict(hidden=32, layers=2, heads=2, ff=64, steps=30, batch=16, length=48)}
SENTINELS = 16


def _batches(ids: list[list[int]], batch: int, length: int, pad: int, rng: np.random.Generator):
  """Endless random batches [batch, length] of the token lists, right-padded (the mask marks real tokens)."""
  while True:
    pick = rng.integers(len(ids), size=batch)
    out = np.full((batch, length), pad, np.int64)
    for r, k in enumerate(pick):
      seq = ids[k][:length]
      out[r, :len(seq)] = seq
    yield out, (out != pad).astype(np.int64)


def _train(model, step_loss, batches, steps: int, lr: float, log=print) -> None:
  import torch  # local: optional: torch is a test / experiment dependency
  opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
  sched = torch.optim.lr_scheduler.LambdaLR(
      opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)) * 0.5 * (1 + math.cos(math.pi * s / steps)))
  model.train()
  for s in range(steps):
    loss = step_loss(*next(batches))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    if (s + 1) % max(1, steps // 10) == 0:
      log(f"  step {s + 1}/{steps}: loss {loss.item():.3f}")
  model.eval()


def _mean_loss(step_loss, ids, batch: int, length: int, pad: int) -> float:
  import torch  # local: optional: torch is a test / experiment dependency
  losses = []
  with torch.no_grad():
    for start in range(0, len(ids), batch):
      chunk = ids[start:start + batch]
      out = np.full((len(chunk), length), pad, np.int64)
      for r, seq in enumerate(chunk):
        out[r, :len(seq[:length])] = seq[:length]
      losses.append(float(step_loss(out, (out != pad).astype(np.int64))) * len(chunk))
  return sum(losses) / len(ids)


def causal_lm(out: str, size: dict, train_texts, heldout_texts, seed: int, start=None, log=print) -> dict:
  """A Llama-style LM trained on `train_texts` (from `start`'s weights if given); saved with the word tokenizer."""
  import torch  # local: optional: torch is a test / experiment dependency
  import transformers  # local: the experiment's PyTorch towers only
  tok = prompt.build_word_tokenizer(corpus.vocabulary())
  pad = tok.pad_token_id
  encode = lambda texts: [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
  torch.manual_seed(seed)
  if start is None:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=size["hidden"], intermediate_size=size["ff"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["heads"] // 2 or 1,
        max_position_embeddings=256, pad_token_id=pad, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True))
  else:
    model = transformers.LlamaForCausalLM.from_pretrained(start)

  def step_loss(ids, mask):
    ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)
    return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss

  train_ids, held_ids = encode(train_texts), encode(heldout_texts)
  before = _mean_loss(step_loss, held_ids, size["batch"], size["length"], pad)
  t0 = time.perf_counter()
  _train(model, step_loss, _batches(train_ids, size["batch"], size["length"], pad, np.random.default_rng(seed)),
         size["steps"], 3e-3 if start is None else 1e-3, log)
  seconds = time.perf_counter() - t0
  after = _mean_loss(step_loss, held_ids, size["batch"], size["length"], pad)
  model.save_pretrained(out)
  if start is None:  # a base LM read plain text only: no chat template (LI-DiT's instruction goes in as text)
    tok.chat_template = None
  tok.save_pretrained(out)
  return {"heldout_loss_before": before, "heldout_loss": after, "seconds": seconds,
          "params": sum(p.numel() for p in model.parameters()), "vocab": len(tok)}


def t5_tokenizer(out: str | None = None):
  """Word-level, T5's conventions: <pad> 0, </s> 1 appended, <unk> 2, sentinels <extra_id_k>."""
  import transformers  # local: the experiment's PyTorch towers only
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors  # local: experiment
  words = corpus.vocabulary()
  sentinels = [f"<extra_id_{k}>" for k in range(SENTINELS)]
  vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *words, *sentinels])}
  backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  backend.normalizer = normalizers.Lowercase()
  backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
  backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                             unk_token="<unk>", extra_special_tokens=sentinels)
  if out:
    tok.save_pretrained(out)
  return tok


def span_corrupt(ids: list[int], rng: np.random.Generator, first_sentinel: int, eos: int,
                 rate: float = 0.15, mean_span: float = 3.0) -> tuple[list[int], list[int]]:
  """T5's objective: about `rate` of the tokens in spans of about `mean_span`, each replaced by a sentinel in the
  input; the target lists each sentinel then its span, then </s>."""
  body = ids[:-1]  # without </s>
  n = len(body)
  masked = np.zeros(n, bool)
  want = max(1, int(round(n * rate)))
  while masked.sum() < want:
    length = max(1, int(rng.poisson(mean_span - 1)) + 1)
    start = int(rng.integers(max(1, n - length + 1)))
    masked[start:start + length] = True
  inputs, target, k, i = [], [], 0, 0
  while i < n:
    if masked[i] and k < SENTINELS:
      inputs.append(first_sentinel + k)
      target.append(first_sentinel + k)
      while i < n and masked[i]:
        target.append(body[i])
        i += 1
      k += 1
    else:
      inputs.append(body[i])
      i += 1
  return inputs + [eos], target + [eos]


def t5_encoder(out: str, size: dict, train_texts, heldout_texts, seed: int, log=print) -> dict:
  """A T5 (encoder + decoder) trained by span corruption; the encoder saved as T5EncoderModel."""
  import torch  # local: optional: torch is a test / experiment dependency
  import transformers  # local: the experiment's PyTorch towers only
  tok = t5_tokenizer()
  first = tok.convert_tokens_to_ids("<extra_id_0>")
  torch.manual_seed(seed)
  cfg = transformers.T5Config(vocab_size=len(tok), d_model=size["hidden"], d_kv=size["hidden"] // size["heads"],
                              d_ff=size["ff"], num_layers=size["layers"], num_decoder_layers=max(1, size["layers"] // 2),
                              num_heads=size["heads"], feed_forward_proj="gated-gelu", dropout_rate=0.0,
                              relative_attention_num_buckets=16, pad_token_id=0, eos_token_id=1,
                              decoder_start_token_id=0, tie_word_embeddings=False)
  model = transformers.T5ForConditionalGeneration(cfg)
  length = size["length"]

  def pairs(texts, rng):
    return [span_corrupt(tok(t)["input_ids"], rng, first, tok.eos_token_id) for t in texts]

  def pad_to(seqs):
    out = np.zeros((len(seqs), length), np.int64)
    for r, s in enumerate(seqs):
      out[r, :len(s[:length])] = s[:length]
    return out

  def loss_of(inputs, targets):
    x, y = torch.from_numpy(inputs), torch.from_numpy(targets)
    return model(input_ids=x, attention_mask=(x != 0).long(), labels=y.masked_fill(y == 0, -100)).loss

  rng = np.random.default_rng(seed)
  train_ids = [tok(t)["input_ids"] for t in train_texts]
  held = pairs(heldout_texts, np.random.default_rng(seed + 1))
  held_in, held_out = pad_to([p[0] for p in held]), pad_to([p[1] for p in held])

  def held_loss():
    with torch.no_grad():
      return float(np.mean([float(loss_of(held_in[s:s + size["batch"]], held_out[s:s + size["batch"]]))
                            for s in range(0, len(held), size["batch"])]))

  def batches():
    while True:
      pick = rng.integers(len(train_ids), size=size["batch"])
      p = [span_corrupt(train_ids[k], rng, first, tok.eos_token_id) for k in pick]
      yield pad_to([a for a, _ in p]), pad_to([b for _, b in p])

  before = held_loss()
  t0 = time.perf_counter()
  _train(model, loss_of, batches(), size["steps"], 3e-3, log)
  seconds = time.perf_counter() - t0
  after = held_loss()
  encoder = transformers.T5EncoderModel(cfg)
  encoder.load_state_dict(model.state_dict(), strict=False)  # shared + encoder.*; the decoder and head dropped
  encoder.save_pretrained(out)
  tok.save_pretrained(out)
  return {"heldout_loss_before": before, "heldout_loss": after, "seconds": seconds,
          "params": sum(p.numel() for p in encoder.parameters()), "vocab": len(tok)}


def instruction_texts(n: int, split: str, seed: int) -> list[str]:
  """Chat turns: system = an instruction, user = a description, assistant = another description of the scene."""
  tok = prompt.build_word_tokenizer(corpus.vocabulary())
  rng = np.random.default_rng([seed, 0x1D])
  out = []
  for scene in corpus.scenes(n, split, rng):
    turns = [{"role": "system", "content": corpus.INSTRUCTIONS[int(rng.integers(len(corpus.INSTRUCTIONS)))]},
             {"role": "user", "content": corpus.describe(scene, rng)}]
    text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    out.append(text[len(tok.bos_token):] + corpus.describe(scene, rng))  # the tokenizer adds <bos> again
  return out


def make_all(out: str, quick: bool = False, steps: int | None = None, seed: int = 0, log=print) -> dict:
  size = dict(SIZES["quick" if quick else "full"])
  if steps:
    size["steps"] = steps
  n_train, n_held = (200, 32) if quick else (20_000, 512)
  train_texts, held_texts = corpus.texts(n_train, "train", seed), corpus.texts(n_held, "heldout", seed)
  report = {"size": size, "train_texts": n_train, "heldout_texts": n_held}
  log("decoder LM (next-token prediction)")
  report["lm"] = causal_lm(os.path.join(out, "lm"), size, train_texts, held_texts, seed, log=log)
  log("a second decoder LM (3/4 the width, another seed): LI-DiT's two-tower and collaborative ablations")
  other = dict(size, hidden=size["hidden"] * 3 // 4, ff=size["ff"] * 2 // 3)
  report["lm_b"] = causal_lm(os.path.join(out, "lm_b"), other, train_texts, held_texts, seed + 1, log=log)
  log("instruction-tuned LM (chat turns)")
  instruct = dict(size, steps=max(1, size["steps"] // 3), length=size["length"] * 2)
  report["lm_instruct"] = causal_lm(os.path.join(out, "lm_instruct"), instruct,
                                    instruction_texts(n_train // 4, "train", seed),
                                    instruction_texts(n_held // 4, "heldout", seed), seed,
                                    start=os.path.join(out, "lm"), log=log)
  log("T5-style encoder (span corruption)")
  report["t5"] = t5_encoder(os.path.join(out, "t5"), size, train_texts, held_texts, seed, log=log)
  with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2)
  return report


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m lidit_jax.experiments.pretrain_towers", description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="checkpoints/pretrained", help="folder for lm/, lm_b/, lm_instruct/, t5/, report.json")
  p.add_argument("--steps", type=int, default=None, help="training steps per tower (default: 1500; quick: 30)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true", help="tiny towers in seconds (tests)")
  a = p.parse_args(argv)
  try:
    import torch  # noqa: F401
  except ImportError:
    print("error: the towers train with PyTorch. Fix: pip install -e \".[study]\" (a CPU build of torch)")
    return 2
  os.makedirs(a.out, exist_ok=True)
  report = make_all(a.out, a.quick, a.steps, a.seed)
  print(json.dumps({k: {m: v[m] for m in ("heldout_loss_before", "heldout_loss", "seconds")}
                    for k, v in report.items() if isinstance(v, dict) and "heldout_loss" in v}))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
