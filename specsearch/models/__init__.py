"""SpecCLIP models: encoders, heads, decoders, losses, built from named configs."""
