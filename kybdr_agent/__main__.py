from kybdr_agent.entry import main

raise SystemExit(main())
