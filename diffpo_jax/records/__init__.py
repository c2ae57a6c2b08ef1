"""Answer files: the record formats generate / refine / score read and write (formats.py), the resumable output
shared by processes (output.py), the record loop of the decoding CLIs (loop.py) and the skeleton those CLIs
share (cli.py)."""
