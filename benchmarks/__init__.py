"""Everything that measures speed: the BN layer alone against its floor and its peers, the
training step, batch renormalization, the kernels' passes alone, A/B of two checkouts."""
