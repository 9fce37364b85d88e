"""dflash_jax.eval"""
