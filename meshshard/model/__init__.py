"""The model side: find and convert weights, cut them into units and shards, run and profile."""
