"""What a run shows while it trains: TensorBoard scalars, the console, system and model statistics."""
