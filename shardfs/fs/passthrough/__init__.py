"""The passthrough filesystem: serves a host directory (see ``fs``)."""

from shardfs.fs.passthrough.fs import PassthroughFs

__all__ = ["PassthroughFs"]
