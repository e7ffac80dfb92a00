"""Fused counterparts of ``torch.nn.utils``."""
