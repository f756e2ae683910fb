"""specsearch command line."""
