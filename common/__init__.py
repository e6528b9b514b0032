"""Plumbing shared by the scripts: environments, networks, logging, replay buffers, run-time helpers.

Nothing here is what a paper is about; see STYLE.md in the team's shared notes.
"""

from common.buffers import EpisodeBuffer, ReplayBuffer
from common.envs import (
    SafeVectorEnv,
    finished_episodes,
    import_safety_gymnasium,
    make_env,
    make_safety_env,
    make_vector_env,
    normalize_env_id,
    observation_slices,
)
from common.logger import Logger
from common.networks import ConvDecoder, ConvEncoder, layer_init, mlp
from common.utils import check_choice, check_finite, check_positive, get_device, seed_everything

__all__ = [
    "EpisodeBuffer",
    "ReplayBuffer",
    "SafeVectorEnv",
    "finished_episodes",
    "import_safety_gymnasium",
    "make_env",
    "make_safety_env",
    "make_vector_env",
    "normalize_env_id",
    "observation_slices",
    "Logger",
    "ConvDecoder",
    "ConvEncoder",
    "layer_init",
    "mlp",
    "check_choice",
    "check_finite",
    "check_positive",
    "get_device",
    "seed_everything",
]
