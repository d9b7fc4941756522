"""`fedbus status`: a running job, live from the bus (model, reader, renderer)."""
