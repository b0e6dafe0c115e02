"""Studies: measurements of cdiff's models that are not product code, each in its own folder with
its outputs (run them from the repository's root folder, e.g. ``python -m studies.synthetic.report``)."""
