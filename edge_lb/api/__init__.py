"""The operator's interface over HTTP: REST (with its OpenAPI document), Prometheus metrics and the
dashboard, on the control socket and the TCP listener."""
