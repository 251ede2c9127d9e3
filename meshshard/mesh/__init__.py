"""The control plane: discovery, membership and gossip, election, and epoch-fenced plans."""
