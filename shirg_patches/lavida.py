"""LaViDa's own any-res path as prune methods: pooled (its default), unpooled, or decided by flags.

They select nothing: every view goes through SigLIP and the projector, is pooled 27x27 -> 14x14
or not, and is merged with one `image_newline` per row. Nothing depends on the diffusion state.
"""
from shirg_patches.registry import PruneMethod, register

register(PruneMethod("lavida", "LaViDa any-res; pooling follows --pool/--no-pool, NOT_ALWASY_DO_2DPOOL, config"))
register(PruneMethod("pool", "LaViDa default: 5 views pooled 27x27->14x14, newline per row (1008 for a square image)",
                     pool=True))
register(PruneMethod("full", "LaViDa unpooled: 5 views x 729 tokens, newline per row (3699 for a square image)",
                     pool=False))
