"""The notebook API (`api`) and the sampling commands (`commands`) under their earlier module name.

`from diffusion_jax import sampling; sampling.sample_fn(...)` keeps working; new code imports `diffusion_jax.api`
(or the names from `diffusion_jax` itself) and `diffusion_jax.commands`.
"""

from diffusion_jax.api import LoadedModel  # noqa: F401
from diffusion_jax.api import decode_fn  # noqa: F401
from diffusion_jax.api import edit_fn  # noqa: F401
from diffusion_jax.api import encode_fn  # noqa: F401
from diffusion_jax.api import inpaint_fn  # noqa: F401
from diffusion_jax.api import interpolate_fn  # noqa: F401
from diffusion_jax.api import likelihood_fn  # noqa: F401
from diffusion_jax.api import load_model  # noqa: F401
from diffusion_jax.api import model_from_config  # noqa: F401
from diffusion_jax.api import progressive_fn  # noqa: F401
from diffusion_jax.api import sample_fn  # noqa: F401
from diffusion_jax.api import save_image_grid  # noqa: F401
from diffusion_jax.api import slerp  # noqa: F401
from diffusion_jax.commands import IMAGE_SUFFIXES  # noqa: F401
from diffusion_jax.commands import MASK_SUFFIX  # noqa: F401
from diffusion_jax.commands import class_grid  # noqa: F401
from diffusion_jax.commands import inpaint_folder  # noqa: F401
from diffusion_jax.commands import sample_to_workdir  # noqa: F401
