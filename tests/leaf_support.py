"""The hub + leaf-node topology the tests run lives in ``fedbus.bus.leafnodes`` (the demo
runs it too); see its docstring for what the tests showed about JetStream domains."""

from fedbus.bus.leafnodes import (DEPLOY, HUB_CONF, HUB_DOMAIN, LeafTopology, LeafTopologyError,  # noqa: F401
                                  wait_js_domain,
                                  NodeProc, leaf_conf_for, leaf_topology, rewrite_conf)
