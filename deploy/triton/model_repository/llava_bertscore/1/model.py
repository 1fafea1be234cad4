"""Triton Python-backend entry point of one ddpo reward, written by `ddpo triton export`.

The reward and its options are in config.pbtxt's parameters. reward_server.triton.backend builds the same reward
object as the ddpo gRPC server, validates each request's items and scores all requests of a dynamic batch together.
"""

import triton_python_backend_utils as pb_utils

from reward_server.triton.backend import TritonRewardModel


class TritonPythonModel(TritonRewardModel):
    def __init__(self):
        super().__init__(pb_utils)
