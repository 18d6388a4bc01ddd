from kybdr_agent.cli import main

raise SystemExit(main())
