"""Training data for GLM-130B's objectives (glm130b.md §3.4): corpora, instruction data, sample builders, batches.

- `corpus`: find / read / split (last 1% held out) / tokenize text corpora.
- `instructions`: the multi-task instruction (MIP) set built from shared/data, and MIP jsonl I/O.
- `objective`: pure [MASK] / [gMASK] / MIP sample builders and packing.
- `pipeline`: `TrainBatches` (deterministic, resumable) and `heldout_batches` (loss and bits per byte).
"""

from glm_jax.data.corpus import Corpus, HeldoutDocument, find_corpus_files, load_corpus, read_documents, split_heldout
from glm_jax.data.instructions import build_instruction_set, read_instructions, write_jsonl
from glm_jax.data.objective import gmask_sample, instruction_sample, mask_sample, pack_sequence
from glm_jax.data.pipeline import (GMASK, MASK, MIP, TrainBatches, bits_per_byte, data_config, heldout_batches,
                                   special_ids_of)

__all__ = [
    'Corpus', 'HeldoutDocument', 'find_corpus_files', 'load_corpus', 'read_documents', 'split_heldout',
    'build_instruction_set', 'read_instructions', 'write_jsonl',
    'gmask_sample', 'instruction_sample', 'mask_sample', 'pack_sequence',
    'GMASK', 'MASK', 'MIP', 'TrainBatches', 'bits_per_byte', 'data_config', 'heldout_batches', 'special_ids_of',
]
