"""PSA memory: summary pool (resident mode); hot-page pool and host tier come later."""
