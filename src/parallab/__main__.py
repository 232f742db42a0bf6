from parallab.cli import main

raise SystemExit(main())
