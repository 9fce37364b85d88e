"""dflash_jax: JAX/Flax NNX trainer for DFlash speculative-decoding drafters with the D-PACE loss."""

__version__ = "0.1.0"

from dflash_jax.blocks import block_targets as block_targets
from dflash_jax.blocks import build_target_layer_ids as build_target_layer_ids
from dflash_jax.blocks import draft_position_ids as draft_position_ids
from dflash_jax.blocks import gather_teacher_logits as gather_teacher_logits
from dflash_jax.blocks import sample_anchors as sample_anchors
from dflash_jax.blocks import teacher_positions as teacher_positions
from dflash_jax.export import export_draft as export_draft
from dflash_jax.export import import_draft as import_draft
from dflash_jax.losses import LossSpec as LossSpec
from dflash_jax.losses import block_loss as block_loss
from dflash_jax.losses import block_loss_from_hidden as block_loss_from_hidden
from dflash_jax.losses import decay_weights as decay_weights
from dflash_jax.losses import dpace_weights as dpace_weights
from dflash_jax.losses import position_weights as position_weights
from dflash_jax.losses import reduce_partials as reduce_partials
from dflash_jax.losses import token_terms as token_terms
from dflash_jax.models.draft import DFlashDraft as DFlashDraft
from dflash_jax.models.draft import DraftCache as DraftCache
from dflash_jax.models.draft import DraftConfig as DraftConfig
from dflash_jax.models.target import TargetConfig as TargetConfig
from dflash_jax.models.target import TargetModel as TargetModel
from dflash_jax.models.target_io import load_target as load_target
