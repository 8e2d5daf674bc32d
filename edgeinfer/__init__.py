"""edgeinfer: machine-learning inference on edge gateways, steered over MQTT."""
