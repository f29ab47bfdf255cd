"""LAMBADA as GLM-130B scores it (glm130b.md §7.5, §10 item 11), a custom task module (`module: eval.lambada.LAMBADA`,
eval/tasks/lambada.yaml).

Each example is a passage without its last word (`inputs_pretokenized`) and that word (`targets_pretokenized`, as
launch/prepare_eval_data.py writes them from `{"text": passage}` lines). The word is encoded as it follows a space
in the passage (' ' + word: a word start for any tokenizer; the icetk layout's dummy prefix gives the same ids).

- Accuracy: passage + [gMASK] (bidirectional context) + <sop> (with `unidirectional: true`, GLM-130B's
  lambada-unidirectional: [gMASK, <sop>] + passage, causal), deterministic beam search with the task's settings
  (GLM-130B: 16 beams, 5 tokens, no-repeat-3-gram, length penalty 1), punctuation banned: `invalid_slices` are the ids
  whose text is punctuation only (derived from the tokenizer: GLM-130B's YAML lists icetk ids), `banned_prefixes` the
  token sequences of the punctuation characters that take several ids, so the word may not start with punctuation.
  Over the beams, best first, the first whose text's second space-separated field is punctuation ("" counts, as in
  GLM-130B's substring test), else the best; its first word, re-tokenized and decoded, must equal the target
  exactly (case-sensitive, after strip()).
- Also per example, for cross-checks (lm-evaluation-harness's LAMBADA reads these): the target's log-probability
  after the same context, on the layout the beam search decodes, and whether every target token is the argmax
  (`target_logprobs`, `target_greedy`), and their summary `Greedy accuracy`.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
from tqdm import tqdm

from eval.data import read_examples, task_files
from eval.metrics import aggregate, is_punctuation
from eval.scoring import continuation_item
from glm_jax import layouts
from glm_jax.generation import blanks
from glm_jax.generation.beam_search import BeamSearchConfig

GENERATION_BATCH = 8
# CJK punctuation a Chinese passage may end a "word" with, besides ASCII's
EXTRA_PUNCTUATION = '，。！？；：、“”‘’（）《》…—'


def punctuation_bans(tokenizer) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
  """(invalid ids, banned prefixes) for this tokenizer: every id whose text is punctuation only (whitespace around
  it allowed), and the id sequence of each punctuation character that encodes to several ids."""
  invalid = []
  for i in range(tokenizer.text_offset, tokenizer.text_offset + tokenizer.num_pieces):
    text = tokenizer.decode([i]).strip()
    if text and all(is_punctuation(ch) for ch in text):
      invalid.append(i)
  prefixes = []
  for ch in string.punctuation + EXTRA_PUNCTUATION:
    ids = tuple(tokenizer.encode(ch))
    if len(ids) > 1 and ids not in prefixes:
      prefixes.append(ids)
  return tuple(invalid), tuple(prefixes)


def first_word(text: str) -> str:
  return text.strip().split(' ')[0]


def choose_beam(texts: list[str]) -> str:
  """GLM-130B's choice among beams (best first): the first whose second field is punctuation, else the best."""
  for text in texts:
    fields = text.strip().split(' ')
    if len(fields) > 1 and fields[1] in string.punctuation:
      return text
  return texts[0] if texts else ''


class LAMBADA:
  def __init__(self, config, data_dir):
    if config.sampling_strategy != 'BeamSearchStrategy':
      raise ValueError(f'{config.source}: sampling_strategy: LAMBADA is scored with BeamSearchStrategy')
    self.config = config
    self.groups = task_files(data_dir, config)
    self.examples = {p: read_examples(p, 'gen') for files in self.groups.values() for p in files}

  def evaluate(self, generator, scorer, progress=True) -> dict:
    tok = generator.tokenizer
    invalid, prefixes = punctuation_bans(tok)
    sid = blanks.special_ids(tok)
    cfg = self.config
    strategy = BeamSearchConfig(num_beams=cfg.num_beams, length_penalty=float(cfg.length_penalty), consider_end=True,
                                no_repeat_ngram_size=cfg.no_repeat_ngram_size, min_gen_length=cfg.min_gen_length,
                                deterministic=True, invalid_slices=tuple(dict.fromkeys(invalid + sid.mask_ids)),
                                banned_prefixes=prefixes)
    max_len = min(cfg.max_seq_length, generator.max_sequence_length)
    out = {}
    for group, files in self.groups.items():
      per_file = []
      for path in files:
        examples = self.examples[path]
        with tqdm(total=2 * len(examples), desc=f'{cfg.name} {Path(path).name}', unit=' steps', leave=False,
                  disable=not progress) as bar:
          per_file.append({'file': str(path), 'examples': len(examples),
                           **self._score_file(generator, scorer, examples, strategy, sid, max_len, bar)})
      out[group] = {'files': per_file, 'aggregate': aggregate(per_file)}
    return out

  def _score_file(self, generator, scorer, examples, strategy, sid, max_len, bar) -> dict:
    tok, cfg = generator.tokenizer, self.config
    contexts, targets = [], []
    for ex in examples:
      ids = tok.encode(ex.inputs.rstrip())
      contexts.append(ids[max(0, len(ids) - (max_len - cfg.max_gen_length - 2)):])  # left-truncated (§7.1)
      targets.append(tok.encode(' ' + ex.targets[0].strip()))
    two_d = bool(generator.model_config.position_encoding_2d)
    # the target's log-probability and greedy flag, on the layout the beam search decodes
    items = []
    for ex, ctx, target in zip(examples, contexts, targets):
      try:
        items.append(continuation_item(ctx, target, sid, use_task_mask=cfg.use_task_mask,
                                       unidirectional=cfg.unidirectional, max_seq_length=max_len,
                                       position_encoding_2d=two_d))
      except ValueError as e:
        raise ValueError(f'{ex.where}: {e}') from None
    scored = scorer.score(items, progress=bar.update)
    logprobs = [float(lp.sum()) for lp, _ in scored]
    greedy = [bool(g.all()) for _, g in scored]
    # beam search, first word
    predictions = []
    for start in range(0, len(examples), GENERATION_BATCH):
      chunk = contexts[start:start + GENERATION_BATCH]
      prompts, masks = zip(*(layouts.generation_task_input(c, sid, use_task_mask=cfg.use_task_mask,
                                                           unidirectional=cfg.unidirectional) for c in chunk))
      result = generator.decoder.generate(generator.weights, prompts, masks, cfg.use_task_mask,
                                          max_gen_length=cfg.max_gen_length, strategy=strategy,
                                          end_tokens=(sid.eos, sid.eop), unidirectional=cfg.unidirectional)
      for beams in result.beams:
        texts = [tok.decode([t for t in beam if t not in (sid.eos, sid.eop)]) for beam in beams]
        predictions.append(tok.decode(tok.encode(first_word(choose_beam(texts)))).strip())
      bar.update(len(chunk))
    correct = [p == tok.decode(t).strip() for p, t in zip(predictions, targets)]
    return {'metrics': {'Accuracy': float(np.mean(correct)), 'Greedy accuracy': float(np.mean(greedy))},
            'predictions': predictions, 'target_logprobs': logprobs, 'target_greedy': greedy}
