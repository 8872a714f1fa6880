from amusd_viz.cli import main

raise SystemExit(main())
