"""Developer scripts of cdiff (not installed with the package); see each script's docstring."""
