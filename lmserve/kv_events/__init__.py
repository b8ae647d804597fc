"""KV-cache events (vLLM's --kv-events-config): blocks stored in and removed from the prefix
cache, published over ZMQ in vLLM's wire format for cache-aware routers."""
