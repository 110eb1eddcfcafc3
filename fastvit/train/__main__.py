from fastvit.train import main

raise SystemExit(main())
