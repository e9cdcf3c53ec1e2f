"""Loss functions, one module per family (HybridMIM heads, contrastive, reconstruction, tokens, GAN)."""
