"""fedbus: federated learning over NATS JetStream."""
__version__ = "0.1.0"
