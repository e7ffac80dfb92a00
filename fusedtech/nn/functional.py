"""Fused counterparts of ``torch.nn.functional``."""
