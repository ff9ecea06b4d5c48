"""The old back end's request path, re-created so every comparison is made in the same run on the same box."""
