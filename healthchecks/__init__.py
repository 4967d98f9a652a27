"""Health checkers for edge-lb backends (one module per protocol) and the rise/fall state machine."""
