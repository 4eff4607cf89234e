from alignd.cli import main

raise SystemExit(main())
