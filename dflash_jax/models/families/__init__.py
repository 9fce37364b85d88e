"""Target families beyond the dense Llama/Qwen2/Qwen3 decoder, one module each (interface: ``base.Family``)."""

from dflash_jax.models.families import gemma3, gpt_oss, qwen3_moe
from dflash_jax.models.families.base import Family

FAMILIES: dict[str, Family] = {f.arch: f for f in (qwen3_moe.FAMILY, gpt_oss.FAMILY, gemma3.FAMILY)}
# checkpoint model_type wrapping a family's decoder -> (config dict -> (decoder config dict, tensor name prefix))
WRAPPERS = {"gemma3": gemma3.unwrap_multimodal}
