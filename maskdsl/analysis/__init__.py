"""The closed-form analysis: per-dimension key intervals, exact pair and tile counts, tile schedules and the
rules every layer shares (which Gluon mode runs a mask, the tile-table contract, tile factorization).
numpy and sympy only; imports maskdsl.spec."""
