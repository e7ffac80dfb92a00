"""torch.library ops, one module per op family: schema, fake kernel and autograd, dispatching at
run time to the backend chosen by fusedtech._backend."""
