"""The SpecCLIP training stages."""
