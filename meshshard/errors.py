"""The one exception type a user sees: the CLI prints its message on one line and exits 2."""


class MeshShardError(Exception):
    """A problem the user can fix (bad input, missing model, impossible plan)."""
