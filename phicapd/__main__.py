from phicapd.cli.daemon import main
import sys

sys.exit(main())
