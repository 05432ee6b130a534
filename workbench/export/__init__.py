"""Taking a compressed model elsewhere: exports that load without workbench, and text generation.

`hf.export_hf` writes the low-rank model as a folder plain transformers loads (its own modeling
code, `trust_remote_code=True`); `dense.export_dense` multiplies the factors back into the standard
architecture; `generation` decodes text from a run's model. `run_files.read_run` checks a run
directory before any of them builds anything from it.
"""
