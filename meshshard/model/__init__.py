"""The model side: locate and convert weights, slice them into units and shards, run and profile them."""
