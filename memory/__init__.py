"""PSA memory: summary pool, hot-page pool with LRU and host tier (hot_pool), hot-pool cache simulator and
access statistics."""
