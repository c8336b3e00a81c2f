"""The oracles and the measurement harness (torch): exact mask semantics, the float64 reference, top-k
selection's reference, pattern metrics, and the problem/inputs/row-check/timer every benchmark shares."""
