"""glm-jax: GLM-130B in JAX/Flax.

The public API (later capabilities import these names; they keep working as the package grows):
- `GLM(config.model)`: the Flax module; `init_cache(config.model, batch, max_length)` for cached decoding.
- `glm_jax.weights`: how the big matrices are stored and multiplied (formats by name, `register` adds one).
- `from_sat_state_dict(state_dict, config.model)` / `to_sat_state_dict(params, config.model)`: SAT <-> params.
- `make_mesh`, `axis_rules`, `init_params`, `param_shardings`: sharding over a named device mesh.
- `save_model(dir, params, config)` / `load_model(dir)`: model checkpoints (also a training run's directory).
"""

from glm_jax.flops import count_params
from glm_jax.kv_cache import init_cache
from glm_jax.model import GLM, GLMConfig
from glm_jax.model_io import load_model, save_model
from glm_jax.sat_convert import from_sat_state_dict, merge_tensor_parallel, split_tensor_parallel, to_sat_state_dict
from glm_jax.sharding import axis_rules, init_params, make_mesh, param_shardings

__all__ = [
    'GLM', 'GLMConfig', 'count_params', 'init_cache', 'axis_rules', 'init_params', 'make_mesh', 'param_shardings',
    'from_sat_state_dict', 'to_sat_state_dict', 'merge_tensor_parallel', 'split_tensor_parallel', 'load_model',
    'save_model',
]
