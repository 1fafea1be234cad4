"""The reward-model service: reward implementations, the registry, micro-batching and the gRPC server."""
