"""glm-jax as an lm-evaluation-harness model, registered as `glm-jax` (tested with lm-eval 0.4.13, the version the
test extras pin).

    import lm_eval, lm_eval.tasks
    from eval.lm_eval_adapter import GLMJaxLM
    lm = GLMJaxLM(checkpoint='runs/tiny')          # or GLMJaxLM(generator=Generator.load(...))
    lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=lm_eval.tasks.TaskManager(include_path=...))

    python launch/run_lm_eval.py --model_args checkpoint=runs/tiny --tasks ... --include_path ...   # lm-eval's CLI

Requests are scored as GLM generates (glm130b.md §7.3): the context, [MASK] (or [gMASK] with use_gmask=True), then
<sop> and the continuation, which sees the whole context bidirectionally, at the generation positions (with [MASK]
this is also §7.2's multiple-choice option layout; with [gMASK] positions continue after the mask, where G130's
multiple-choice code gives <sop> the mask's position); many requests per compiled call (eval/scoring.py).
`is_greedy`: every continuation token is the argmax, i.e. greedy decoding would produce the continuation.
`loglikelihood_rolling`: GLM-130B's perplexity windows (§7.4), whose scored spans tile the text. `generate_until`:
greedy decoding after text + [MASK or gMASK] + <sop>, the text cut at the first `until` string.

Where a context ends and its continuation begins (one rule, for every request): whitespace at the end of the context
moves to the front of the continuation, then each is encoded on its own, as GLM-130B encodes a context and each of
its options. lm-eval's continuations carry their leading space (" Paris"): with glm-jax's own tokenizers (no dummy
prefix, spaces are pieces) " Paris" encodes as the word start it is inside the whole text, and a Chinese
continuation, which has no space, as the characters it is; with GLM-130B's icetk layout every encode call begins
with a word-start marker, so a continuation is always scored as a word start, as GLM-130B scores its options.
"""

from __future__ import annotations

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from eval.scoring import Scorer, continuation_item, window_items
from glm_jax import layouts
from glm_jax.generation import blanks
from glm_jax.generation.decode import GREEDY

GENERATION_BATCH = 8


def split_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) by the rule in the module docstring."""
  stripped = context.rstrip()
  continuation = context[len(stripped):] + continuation
  return tokenizer.encode(stripped), tokenizer.encode(continuation)


def _flag(value) -> bool:
  return value if isinstance(value, bool) else str(value).lower() in ('1', 'true', 'yes')


@register_model('glm-jax')
class GLMJaxLM(LM):
  """model_args: checkpoint (a glm-jax checkpoint or run directory), tokenizer (default: the checkpoint's),
  quantization_bit_width (4 or 8), use_gmask ([gMASK] instead of [MASK]), batch_tokens (tokens per compiled call),
  max_gen_toks. lm-eval's batch_size / max_batch_size / device are accepted and unused: batches are sized in tokens,
  devices come from JAX."""

  def __init__(self, checkpoint: str | None = None, generator=None, tokenizer: str | None = None,
               quantization_bit_width=None, use_gmask=False, batch_tokens=8192, max_gen_toks=256,
               batch_size=None, max_batch_size=None, device=None):
    super().__init__()
    del batch_size, max_batch_size, device
    if generator is None:
      if checkpoint is None:
        raise ValueError('glm-jax: model_args needs checkpoint=<a glm-jax checkpoint or run directory>')
      from glm_jax.generation.api import Generator
      bits = int(quantization_bit_width) if quantization_bit_width else None
      generator = Generator.load(checkpoint, tokenizer, quantization_bit_width=bits)
    self.generator = generator
    self.tokenizer = generator.tokenizer
    self.scorer = Scorer(generator, max_batch_tokens=int(batch_tokens))
    self.special_ids = blanks.special_ids(self.tokenizer)
    self.use_gmask = _flag(use_gmask)
    self.max_gen_toks = int(max_gen_toks)
    self._max_len = generator.max_sequence_length
    self._two_d = bool(generator.model_config.position_encoding_2d)

  def _score(self, items, disable_tqdm, desc):
    with tqdm(total=len(items), desc=desc, disable=disable_tqdm) as bar:
      return self.scorer.score(items, progress=bar.update)

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    items = []
    for req in requests:
      ctx, cont = split_request(self.tokenizer, *req.args)
      if not cont:
        raise ValueError(f'glm-jax: an empty continuation after {req.args[0][-40:]!r}')
      items.append(continuation_item(ctx, cont, self.special_ids, use_task_mask=self.use_gmask,
                                     max_seq_length=self._max_len, position_encoding_2d=self._two_d))
    return [(float(logp.sum()), bool(greedy.all()))
            for logp, greedy in self._score(items, disable_tqdm, 'glm-jax loglikelihood')]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    items, owner = [], []
    for k, req in enumerate(requests):
      windows = window_items(self.tokenizer.encode(req.args[0]), self.special_ids, max_seq_length=self._max_len,
                             generation_length=min(256, self._max_len - 2), use_task_mask=self.use_gmask,
                             unidirectional=False, position_encoding_2d=self._two_d)
      items += windows
      owner += [k] * len(windows)
    totals = [0.0] * len(requests)
    for k, (logp, _) in zip(owner, self._score(items, disable_tqdm, 'glm-jax loglikelihood_rolling')):
      totals[k] += float(logp.sum())
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False):
    sid = self.special_ids
    out = []
    for start in tqdm(range(0, len(requests), GENERATION_BATCH), desc='glm-jax generate_until',
                      disable=disable_tqdm):
      chunk = [req.args for req in requests[start:start + GENERATION_BATCH]]
      n = max(int(kwargs.get('max_gen_toks', self.max_gen_toks)) for _, kwargs in chunk)
      keep = self._max_len - n - 2
      prompts, masks = zip(*(layouts.generation_task_input(self.tokenizer.encode(context)[-keep:], sid,
                                                           use_task_mask=self.use_gmask) for context, _ in chunk))
      result = self.generator.decoder.generate(self.generator.weights, prompts, masks, self.use_gmask,
                                               max_gen_length=n, strategy=GREEDY, end_tokens=(sid.eos, sid.eop))
      for (_, kwargs), ids in zip(chunk, result.tokens):
        text = self.tokenizer.decode([t for t in ids if t not in (sid.eos, sid.eop)])
        until = kwargs.get('until') or []
        for stop in [until] if isinstance(until, str) else until:
          if stop and stop in text:
            text = text[:text.index(stop)]
        out.append(text)
    return out
