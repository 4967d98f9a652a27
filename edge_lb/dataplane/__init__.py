"""The XDP data plane from Python: loading (the only place that imports bcc), map I/O, the desired
state and its programmer, Maglev, simulate and bench."""
