"""Gaussian-attention-bias (GAB) and PreLayerNorm (PLN) vision transformers for timm."""
