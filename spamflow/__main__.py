from spamflow.cli import main

raise SystemExit(main())
