"""Network-namespace labs, the demo and their helpers: used by tests, benchmarks and `edge-lb demo`, never
imported by what runs in production."""
