from portguard.cli import main

raise SystemExit(main())
