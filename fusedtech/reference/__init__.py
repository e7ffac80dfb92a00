"""Pure-PyTorch oracles: the math of every fused op spelled out with torch ops, in the same order
and with the same casts as the kernels. They are what the tests compare each implementation with,
and they run as the ``torch`` backend anywhere torch runs."""
