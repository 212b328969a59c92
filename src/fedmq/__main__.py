from fedmq.cli import main

raise SystemExit(main())
