"""The papers' math as plain ``torch.nn`` modules (no timm or mmseg needed)."""
