"""The model registry: a signed manifest per committed model version, tags, export,
rollback and retention (which versions, claim-check blobs and stream messages to keep)."""
