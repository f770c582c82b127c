"""What every stage shares: option checks, the name registry, crash-safe files, the device policy,
process-wide CPU settings and the lazy torch import. Nothing here imports a stage."""
