# The secure-aggregation bodies add themselves to messages.MESSAGE_TYPES when imported;
# importing them with the package means no user of the registry can miss them.
from fedbus.protocol import secagg as _secagg  # noqa: F401
