from edge_lb.cli import main

raise SystemExit(main())
