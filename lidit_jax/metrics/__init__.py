"""Image metrics in JAX: FID (the TF-ported Inception v3 of pytorch-fid / clean-fid) and CLIP score."""
