"""dflash_jax.train"""
