"""dflash_jax.data"""
