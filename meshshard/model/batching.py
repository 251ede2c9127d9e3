"""How stages batch: one forward pass takes the steps of up to MAX_BATCH sessions, and a
profile times passes of BATCHES sessions. Data the planner's flow model reads too."""

MAX_BATCH = 16  # sessions a stage takes into one forward pass
BATCHES = (2, 3, 4, 8, MAX_BATCH)  # batch sizes a profile times
