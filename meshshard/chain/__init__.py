"""The data plane: stages that run shards, the links between them, and sessions at the origin."""
