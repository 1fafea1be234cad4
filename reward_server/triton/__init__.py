"""The rewards on NVIDIA Triton Inference Server: model-repository export, the Python-backend model, the launcher."""
