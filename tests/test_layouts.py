"""glm_jax.layouts against arrays worked out by hand from glm130b.md (§3.4, §5.1, §7.2-7.4, §10 items 3, 9, 10, 17).

Every expected array below is written out literally. Masks are grids of '1' (may attend) / '0'.
Special ids are small fakes so the arrays stay readable: [MASK]=90 [gMASK]=91 [sMASK]=92 <sop>=94 <eop>=95 eos=2.
"""

import numpy as np
import pytest

from glm_jax import layouts as L

IDS = L.SpecialIds(mask=90, gmask=91, smask=92, sop=94, eop=95, eos=2, pad=0)
MASK, GMASK, SMASK, SOP, EOP, EOS = 90, 91, 92, 94, 95, 2


def grid(*rows):
  return np.array([[c == '1' for c in r.replace(' ', '')] for r in rows], dtype=bool)


def eq(actual, expected):
  np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))


def test_glm130b_ids():
  ids = L.GLM130B_IDS
  assert (ids.mask, ids.gmask, ids.smask, ids.sop, ids.eop, ids.eos, ids.pad) == (
      150000, 150001, 150002, 150004, 150005, 20002, 0)
  assert L.SpecialIds.glm130b() == ids


# §5.1 generate.py ---------------------------------------------------------------------------------------------


def test_prepare_blank_filling():
  # "A [MASK] B": [MASK] chosen, text does not end with a mask -> eos appended.
  b = L.prepare_blank_filling([11, 12, MASK, 13], IDS)
  assert (b.seq, b.generation_mask, b.use_gmask) == ([11, 12, MASK, 13, EOS], MASK, False)
  # no mask at all -> [gMASK] appended, and then the text ends with a mask -> no eos.
  b = L.prepare_blank_filling([11, 12, 13], IDS)
  assert (b.seq, b.generation_mask, b.use_gmask) == ([11, 12, 13, GMASK], GMASK, True)
  # [sMASK] at the end: chosen, not gMASK, no eos.
  b = L.prepare_blank_filling([11, SMASK], IDS)
  assert (b.seq, b.generation_mask, b.use_gmask) == ([11, SMASK], SMASK, False)
  # [MASK] wins over [sMASK].
  assert L.prepare_blank_filling([SMASK, 11, MASK], IDS).generation_mask == MASK
  # explicit [gMASK] followed by text: nothing appended but eos.
  b = L.prepare_blank_filling([GMASK, 11], IDS)
  assert (b.seq, b.generation_mask, b.use_gmask) == ([GMASK, 11, EOS], GMASK, True)
  # raw text "A [MASK]   " ends in spaces that tokenise to nothing: caller says it does not end with "MASK]".
  assert L.prepare_blank_filling([11, MASK], IDS, ends_with_mask=False).seq == [11, MASK, EOS]


def test_generation_mask_blank():
  # 5-token context "A B [MASK] C </s>", <sop> appended: C = 6; two tokens to generate.
  layout, mask_position = L.build_generation_input([11, 12, MASK, 13, EOS], IDS, generation_mask=MASK,
                                                   use_gmask=False, max_gen_length=2)
  assert mask_position == 2
  eq(layout.tokens, [11, 12, MASK, 13, EOS, SOP, -1, -1])
  eq(layout.position_ids, [0, 1, 2, 3, 4, 2, 2, 2])  # <sop> and generated tokens at the [MASK]'s position
  eq(layout.attention_mask, grid(  # columns 0..4 (context incl. mask and eos) seen by all; <sop> onwards causal
      '11111000',
      '11111000',
      '11111000',
      '11111000',
      '11111000',
      '11111100',
      '11111110',
      '11111111'))
  layout_2d, _ = L.build_generation_input([11, 12, MASK, 13, EOS], IDS, generation_mask=MASK, use_gmask=False,
                                          max_gen_length=2, position_encoding_2d=True)
  eq(layout_2d.position_ids, [[0, 1, 2, 3, 4, 2, 2, 2],
                              [0, 0, 0, 0, 0, 1, 2, 3]])
  eq(layout_2d.attention_mask, layout.attention_mask)


def test_generation_mask_gmask():
  # "A B C" -> A B C [gMASK] (no eos), input + <sop>: C = 5; two tokens to generate.
  b = L.prepare_blank_filling([11, 12, 13], IDS)
  layout, mask_position = L.build_generation_input(b.seq, IDS, generation_mask=b.generation_mask,
                                                   use_gmask=b.use_gmask, max_gen_length=2)
  assert mask_position == 3
  eq(layout.tokens, [11, 12, 13, GMASK, SOP, -1, -1])
  eq(layout.position_ids, [0, 1, 2, 3, 4, 5, 6])  # gMASK: positions just continue
  eq(layout.attention_mask, grid(
      '1111000',
      '1111000',
      '1111000',
      '1111000',
      '1111100',
      '1111110',
      '1111111'))
  layout_2d = L.generation_layout(b.seq + [SOP], 3, 2, use_gmask=True, position_encoding_2d=True)
  eq(layout_2d.position_ids, [[0, 1, 2, 3, 3, 3, 3],
                              [0, 0, 0, 0, 1, 2, 3]])


def test_splice_blank():
  assert L.splice_blank([11, 12, MASK, 13, EOS], 2, [21, 22]) == [11, 12, 21, 22, 13, EOS]


# §7.2 multiple choice -----------------------------------------------------------------------------------------


def test_multiple_choice_multi_token():
  c = L.multiple_choice_layout([11, 12, 13], [[21, 22], [31, 32, 33]], IDS)
  assert not c.single_token
  eq(c.layout.tokens, [11, 12, 13, MASK, SOP, 21, SOP, 31, 32])
  eq(c.layout.position_ids, [0, 1, 2, 3, 3, 3, 3, 3, 3])
  eq(c.layout.attention_mask, grid(
      '1111 00 000',
      '1111 00 000',
      '1111 00 000',
      '1111 00 000',
      '1111 10 000',
      '1111 11 000',
      '1111 00 100',
      '1111 00 110',
      '1111 00 111'))
  eq(c.read_rows[0], [4, 5])
  eq(c.read_rows[1], [6, 7, 8])
  eq(c.choice_targets[0], [21, 22])
  eq(c.choice_targets[1], [31, 32, 33])

  mt = L.multiple_choice_layout([11, 12, 13], [[21, 22], [31, 32, 33]], IDS, use_multitask_encoding=True)
  eq(mt.layout.position_ids, [0, 1, 2, 3, 3, 4, 3, 4, 5])
  eq(mt.layout.attention_mask, c.layout.attention_mask)

  # [gMASK]: G130's code counts from mask_position = len(text), so <sop> shares the [gMASK] position.
  g = L.multiple_choice_layout([11, 12, 13], [[21, 22], [31, 32, 33]], IDS, use_task_mask=True)
  eq(g.layout.tokens, [11, 12, 13, GMASK, SOP, 21, SOP, 31, 32])
  eq(g.layout.position_ids, [0, 1, 2, 3, 3, 4, 3, 4, 5])

  c2 = L.multiple_choice_layout([11, 12, 13], [[21, 22], [31, 32, 33]], IDS, position_encoding_2d=True)
  eq(c2.layout.position_ids, [[0, 1, 2, 3, 3, 3, 3, 3, 3],
                              [0, 0, 0, 0, 1, 2, 1, 2, 3]])


def test_multiple_choice_existing_blank_and_empty_choice():
  c = L.multiple_choice_layout([11, MASK, 12], [[21, 22], []], IDS)
  eq(c.layout.tokens, [11, MASK, 12, SOP, 21, SOP])
  eq(c.layout.position_ids, [0, 1, 2, 1, 1, 1])
  eq(c.layout.attention_mask, grid(
      '111 00 0',
      '111 00 0',
      '111 00 0',
      '111 10 0',
      '111 11 0',
      '111 00 1'))
  eq(c.read_rows[1], [5])
  eq(c.choice_targets[1], [EOP])  # an empty choice is scored as <eop>


def test_multiple_choice_single_token():
  c = L.multiple_choice_layout([11, 12], [[21], [22], [23]], IDS)
  assert c.single_token
  eq(c.layout.tokens, [11, 12, MASK, SOP])  # one <sop> for all options
  eq(c.layout.position_ids, [0, 1, 2, 2])
  eq(c.layout.attention_mask, grid(
      '1110',
      '1110',
      '1110',
      '1111'))
  for i, t in enumerate([21, 22, 23]):
    eq(c.read_rows[i], [3])
    eq(c.choice_targets[i], [t])

  # G130 decides single-token per dataset: forcing the multi-token layout gives one <sop> block per option.
  m = L.multiple_choice_layout([11, 12], [[21], [22], [23]], IDS, single_token=False)
  eq(m.layout.tokens, [11, 12, MASK, SOP, SOP, SOP])
  eq(m.layout.position_ids, [0, 1, 2, 2, 2, 2])
  eq(m.layout.attention_mask, grid(
      '111 000',
      '111 000',
      '111 000',
      '111 100',
      '111 010',
      '111 001'))
  eq(m.read_rows[2], [5])


# §7.3 generation tasks ----------------------------------------------------------------------------------------


def test_generation_task_bidirectional_mask():
  layout, target_pos = L.generation_task_layout([11, 12, 13], IDS, max_gen_length=2)
  eq(layout.tokens, [11, 12, 13, MASK, SOP])
  eq(layout.position_ids, [0, 1, 2, 3, 3])
  eq(target_pos, [3, 3])
  eq(layout.attention_mask, grid(
      '11110',
      '11110',
      '11110',
      '11110',
      '11111'))
  layout_2d, target_2d = L.generation_task_layout([11, 12, 13], IDS, max_gen_length=2, position_encoding_2d=True)
  eq(layout_2d.position_ids, [[0, 1, 2, 3, 3],
                              [0, 0, 0, 0, 1]])
  eq(target_2d, [[3, 3],
                 [2, 3]])


def test_generation_task_bidirectional_gmask():
  layout, target_pos = L.generation_task_layout([11, 12, 13], IDS, max_gen_length=2, use_task_mask=True)
  eq(layout.tokens, [11, 12, 13, GMASK, SOP])
  eq(layout.position_ids, [0, 1, 2, 3, 4])
  eq(target_pos, [5, 6])
  eq(layout.attention_mask, grid(
      '11110',
      '11110',
      '11110',
      '11110',
      '11111'))


def test_generation_task_unidirectional():
  layout, target_pos = L.generation_task_layout([11, 12, 13], IDS, max_gen_length=2, use_task_mask=True,
                                                unidirectional=True)
  eq(layout.tokens, [GMASK, SOP, 11, 12, 13])  # mask and <sop> prepended
  eq(layout.position_ids, [0, 1, 2, 3, 4])
  eq(target_pos, [5, 6])
  eq(layout.attention_mask, grid(  # fully causal
      '10000',
      '11000',
      '11100',
      '11110',
      '11111'))
  layout_2d, target_2d = L.generation_task_layout([11, 12, 13], IDS, max_gen_length=2, use_task_mask=True,
                                                  unidirectional=True, position_encoding_2d=True)
  eq(layout_2d.position_ids, [[0, 0, 0, 0, 0],
                              [0, 1, 2, 3, 4]])
  eq(target_2d, [[0, 0],
                 [5, 6]])
  with pytest.raises(ValueError):
    L.generation_task_layout([11], IDS, max_gen_length=2, unidirectional=True)


def test_generation_task_existing_blank():
  layout, target_pos = L.generation_task_layout([11, MASK, 12], IDS, max_gen_length=2)
  eq(layout.tokens, [11, MASK, 12, SOP])
  eq(layout.position_ids, [0, 1, 2, 1])
  eq(target_pos, [1, 1])
  eq(layout.attention_mask, grid(
      '1110',
      '1110',
      '1110',
      '1111'))


def test_pad_batch_and_extend_for_generation():
  a, target_a = L.generation_task_layout([11, MASK, 12], IDS, max_gen_length=2)  # 4 tokens
  b, target_b = L.generation_task_layout([11, 12, 13], IDS, max_gen_length=2)  # 5 tokens
  batch = L.pad_batch([a, b], pad_to_multiple=4)  # longest 5 -> 8
  eq(batch.tokens, [[11, MASK, 12, SOP, 0, 0, 0, 0],
                    [11, 12, 13, MASK, SOP, 0, 0, 0]])
  eq(batch.position_ids, [[0, 1, 2, 1, 0, 0, 0, 0],
                          [0, 1, 2, 3, 3, 0, 0, 0]])
  assert batch.attention_mask.shape == (2, 1, 8, 8)
  assert batch.targets is None and batch.loss_mask is None
  eq(batch.attention_mask[0, 0], grid(
      '11100000',
      '11100000',
      '11100000',
      '11110000',
      '00000000',
      '00000000',
      '00000000',
      '00000000'))
  self_pad = L.pad_batch([a, b], pad_to_multiple=4, pad_rows_attend_self=True)
  eq(self_pad.attention_mask[0, 0], grid(
      '11100000',
      '11100000',
      '11100000',
      '11110000',
      '00001000',
      '00000100',
      '00000010',
      '00000001'))

  # New tokens go after the padded length; generated rows copy the <sop> row, then causal.
  full = L.extend_for_generation(batch, np.array([4, 5]), np.stack([target_a, target_b]))
  eq(full.tokens[1], [11, 12, 13, MASK, SOP, 0, 0, 0, -1, -1])
  eq(full.position_ids, [[0, 1, 2, 1, 0, 0, 0, 0, 1, 1],
                         [0, 1, 2, 3, 3, 0, 0, 0, 3, 3]])
  eq(full.attention_mask[1, 0], grid(
      '11110000 00',
      '11110000 00',
      '11110000 00',
      '11110000 00',
      '11111000 00',
      '00000000 00',
      '00000000 00',
      '00000000 00',
      '11111000 10',
      '11111000 11'))

  # Without padding, the §7.3 path gives exactly generate.py's §5.1 layout.
  unpadded = L.extend_for_generation(L.pad_batch([b], pad_to_multiple=1), np.array([5]), target_b[None])
  ref = L.generation_layout([11, 12, 13, MASK, SOP], 3, 2, use_gmask=False)
  eq(unpadded.tokens[0], ref.tokens)
  eq(unpadded.position_ids[0], ref.position_ids)
  eq(unpadded.attention_mask[0, 0], ref.attention_mask)


# §7.4 language-model windows ----------------------------------------------------------------------------------


def test_lm_windows():
  doc = list(range(101, 113))  # 12 tokens t0..t11 = 101..112
  w = L.lm_window_layouts(doc, IDS, max_seq_length=8, generation_length=3, use_task_mask=True)
  assert len(w) == 3  # ceil((12 - 7) / 3) + 1

  # window 0: doc[0:7], no prompt, all 7 tokens scored
  eq(w[0].tokens, [GMASK, SOP, 101, 102, 103, 104, 105, 106])
  eq(w[0].targets, [GMASK, 101, 102, 103, 104, 105, 106, 107])
  eq(w[0].position_ids, [0, 1, 2, 3, 4, 5, 6, 7])
  eq(w[0].loss_mask, [0, 1, 1, 1, 1, 1, 1, 1])
  eq(w[0].attention_mask, grid(
      '10000000',
      '11000000',
      '11100000',
      '11110000',
      '11111000',
      '11111100',
      '11111110',
      '11111111'))

  # window 1: doc[3:10]; prompt = first 7 - 3 = 4 tokens, text = the next 3
  eq(w[1].tokens, [104, 105, 106, 107, GMASK, SOP, 108, 109])
  eq(w[1].targets, [104, 105, 106, 107, GMASK, 108, 109, 110])
  eq(w[1].position_ids, [0, 1, 2, 3, 4, 5, 6, 7])
  eq(w[1].loss_mask, [0, 0, 0, 0, 0, 1, 1, 1])
  eq(w[1].attention_mask, grid(
      '11111000',
      '11111000',
      '11111000',
      '11111000',
      '11111000',
      '11111100',
      '11111110',
      '11111111'))

  # window 2: doc[6:12] (6 tokens): prompt 4, text 2
  eq(w[2].tokens, [107, 108, 109, 110, GMASK, SOP, 111])
  eq(w[2].targets, [107, 108, 109, 110, GMASK, 111, 112])
  eq(w[2].position_ids, [0, 1, 2, 3, 4, 5, 6])
  eq(w[2].loss_mask, [0, 0, 0, 0, 0, 1, 1])
  eq(w[2].attention_mask, grid(
      '1111100',
      '1111100',
      '1111100',
      '1111100',
      '1111100',
      '1111110',
      '1111111'))

  # the scored targets tile the document exactly once
  scored = np.concatenate([x.targets[x.loss_mask == 1] for x in w])
  eq(scored, doc)

  w2d = L.lm_window_layouts(doc, IDS, max_seq_length=8, generation_length=3, use_task_mask=True,
                            position_encoding_2d=True)
  eq(w2d[1].position_ids, [[0, 1, 2, 3, 4, 4, 4, 4],
                           [0, 0, 0, 0, 0, 1, 2, 3]])


def test_lm_windows_unidirectional_and_short():
  doc = list(range(101, 113))
  w = L.lm_window_layouts(doc, IDS, max_seq_length=8, generation_length=3, unidirectional=True)
  assert len(w) == 3
  eq(w[1].tokens, [MASK, SOP, 104, 105, 106, 107, 108, 109])  # no prompt: windows overlap
  eq(w[1].targets, [MASK, 104, 105, 106, 107, 108, 109, 110])
  eq(w[1].loss_mask, [0, 1, 1, 1, 1, 1, 1, 1])
  short = L.lm_window_layouts([101, 102], IDS, max_seq_length=8, generation_length=3)
  assert len(short) == 1
  eq(short[0].tokens, [MASK, SOP, 101])
  eq(short[0].targets, [MASK, 101, 102])


# §3.4 training samples and packing ----------------------------------------------------------------------------


def test_training_sample_two_spans():
  # text 11..20; spans [13, 14] (at 2-3) and [17, 18, 19] (at 6-8) -> Part A 11 12 [M] 15 16 [M] 20.
  # Emitted second span first (the caller's permutation).
  x = L.training_sample_layout([11, 12, MASK, 15, 16, MASK, 20], [(5, [17, 18, 19]), (2, [13, 14])], IDS)
  eq(x.tokens, [11, 12, MASK, 15, 16, MASK, 20, SOP, 17, 18, 19, SOP, 13, 14])
  eq(x.targets, [11, 12, MASK, 15, 16, MASK, 20, 17, 18, 19, EOP, 13, 14, EOP])
  eq(x.position_ids, [0, 1, 2, 3, 4, 5, 6, 5, 5, 5, 5, 2, 2, 2])
  eq(x.loss_mask, [0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
  eq(x.attention_mask, grid(
      '1111111 0000000',
      '1111111 0000000',
      '1111111 0000000',
      '1111111 0000000',
      '1111111 0000000',
      '1111111 0000000',
      '1111111 0000000',
      '1111111 1000000',
      '1111111 1100000',
      '1111111 1110000',
      '1111111 1111000',
      '1111111 1111100',
      '1111111 1111110',
      '1111111 1111111'))
  x2d = L.training_sample_layout([11, 12, MASK, 15, 16, MASK, 20], [(5, [17, 18, 19]), (2, [13, 14])], IDS,
                                 position_encoding_2d=True)
  eq(x2d.position_ids, [[0, 1, 2, 3, 4, 5, 6, 5, 5, 5, 5, 2, 2, 2],
                        [0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 1, 2, 3]])
  with pytest.raises(ValueError):
    L.training_sample_layout([11, 12], [(1, [13])], IDS)  # index 1 is not a mask token


def test_gmask_training_sample():
  x = L.gmask_training_sample_layout([11, 12, 13], [21, 22], IDS)
  eq(x.tokens, [11, 12, 13, GMASK, SOP, 21, 22])
  eq(x.targets, [11, 12, 13, GMASK, 21, 22, EOP])
  eq(x.position_ids, [0, 1, 2, 3, 4, 5, 6])
  eq(x.loss_mask, [0, 0, 0, 0, 1, 1, 1])
  eq(x.attention_mask, grid(
      '1111000',
      '1111000',
      '1111000',
      '1111000',
      '1111100',
      '1111110',
      '1111111'))
  x2d = L.gmask_training_sample_layout([11, 12, 13], [21, 22], IDS, position_encoding_2d=True)
  eq(x2d.position_ids, [[0, 1, 2, 3, 3, 3, 3],
                        [0, 0, 0, 0, 1, 2, 3]])


def test_pack_samples():
  a = L.gmask_training_sample_layout([11], [21], IDS)  # [11 G sop 21] / [11 G 21 eop]
  b = L.training_sample_layout([MASK, 12, 13], [(0, [31])], IDS)  # [M 12 13 sop 31] / [M 12 13 31 eop]
  p = L.pack_samples([a, b], seq_len=11)
  eq(p.tokens, [11, GMASK, SOP, 21, MASK, 12, 13, SOP, 31, 0, 0])
  eq(p.targets, [11, GMASK, 21, EOP, MASK, 12, 13, 31, EOP, 0, 0])
  eq(p.position_ids, [0, 1, 2, 3, 0, 1, 2, 0, 0, 0, 0])
  eq(p.loss_mask, [0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0])
  eq(p.segment_ids, [1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0])
  eq(p.attention_mask, grid(
      '1100 00000 00',
      '1100 00000 00',
      '1110 00000 00',
      '1111 00000 00',
      '0000 11100 00',
      '0000 11100 00',
      '0000 11100 00',
      '0000 11110 00',
      '0000 11111 00',
      '0000 00000 10',
      '0000 00000 01'))
  with pytest.raises(ValueError):
    L.pack_samples([a, b], seq_len=8)
