"""Training: AdamW with GLM-130B's schedule and Embedding Gradient Shrink, loss scaling, the sharded train step."""

from glm_jax.train.optimizer import (SplitEmbeddingGrads, decay_mask, embedding_gradient_shrink, make_base_optimizer,
                                     make_egs_schedule, make_optimizer, make_schedule)
from glm_jax.train.precision import LossScaleConfig, LossScaleState, init_loss_scale, update_loss_scale
from glm_jax.train.step import TrainState, init_train_state, make_train_step, state_shardings

__all__ = [
    'SplitEmbeddingGrads', 'decay_mask', 'embedding_gradient_shrink', 'make_base_optimizer', 'make_egs_schedule',
    'make_optimizer', 'make_schedule', 'LossScaleConfig', 'LossScaleState', 'init_loss_scale', 'update_loss_scale',
    'TrainState', 'init_train_state', 'make_train_step', 'state_shardings',
]
