"""``broadfast demo``: the whole loop on the embedded stack, with a live view and a summary."""
