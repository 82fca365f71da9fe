"""`qmerge demo`: the whole path on a built-in tiny model (tiny.py builds it, task.py is the lookup task it
learns, run.py trains, merges, exports and scores it)."""
