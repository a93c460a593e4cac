"""DeepEyesV2's search tools, the pure core: an offline BM25 index (`index`), the backends that answer
a text query or replay cached image-search results by row id (`backends`), the texts the model
reads (`format`) and a synthetic corpus for the tiny scenario (`corpus`). No Ray import here: the
tool classes and their Serve deployment wrap these.
"""
