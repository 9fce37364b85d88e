"""Target families, one module each (interface: ``base.Family``): the dense Llama/Qwen2/Qwen3 decoder and its
variants Qwen3-MoE, gpt-oss and Gemma 3. The registry below is the list of supported architectures."""

from dflash_jax.models.families import dense, gemma3, gpt_oss, qwen3_moe
from dflash_jax.models.families.base import Family

FAMILIES: dict[str, Family] = {f.arch: f for f in (*dense.FAMILIES, qwen3_moe.FAMILY, gpt_oss.FAMILY, gemma3.FAMILY)}
SUPPORTED_ARCHS: tuple[str, ...] = tuple(FAMILIES)
# checkpoint model_type wrapping a family's decoder -> (config dict -> (decoder config dict, tensor name prefix))
WRAPPERS = {"gemma3": gemma3.unwrap_multimodal}


def family(arch: str, key: str = "target arch") -> Family:
    """The family of ``arch``; ValueError naming ``key`` and the supported ones."""
    if arch not in FAMILIES:
        raise ValueError(f"{key} {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    return FAMILIES[arch]
