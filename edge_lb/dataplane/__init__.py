"""The XDP data plane from Python: loading (loader.py, the only module that imports bcc), map I/O, the desired
state and its programmer, Maglev, simulate and bench."""
