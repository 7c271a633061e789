"""shardfs."""
