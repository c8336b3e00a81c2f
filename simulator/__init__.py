"""GNA-style tile-schedule simulator: predicts what a tiled kernel visits, before any GPU runs."""
