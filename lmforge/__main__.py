from lmforge.apps.cli import main

raise SystemExit(main())
