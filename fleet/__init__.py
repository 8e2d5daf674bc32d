"""The operator side: edge-fleet CLI, artifact server and the job client."""
