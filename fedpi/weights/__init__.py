"""Weights on the wire: the manifest, digests, the sending and receiving sides of a weight stream, the wire codec of
data chunks and compression. `fedpi.weights.serde` gathers what the services use."""

import warnings

# Received chunks are read through read-only views, never written: torch's warning about that does not apply.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
